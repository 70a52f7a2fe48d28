//! Records written with a Produce request made here, byte by byte, for what no
//! client library's safe interface writes: a header name that is not UTF-8
//! (the protocol allows any bytes; rust-rdkafka takes names as `&str`).
//! Produce v3, the first version with record batches of magic 2: one
//! uncompressed batch to one partition's leader, acknowledged by all replicas.
#![allow(dead_code)]

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the metadata request, the connection and the answer may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// The correlation id of the one request a connection sends.
const CORRELATION: i32 = 1;

/// A record as the batch carries it: any bytes in its key, value and header
/// names.
pub(crate) struct RawRecord<'a> {
    pub(crate) key: Option<&'a [u8]>,
    pub(crate) value: &'a [u8],
    pub(crate) headers: &'a [(&'a [u8], &'a [u8])],
}

/// Write `records` to `topic`/`partition` of the cluster at `brokers`, through
/// the partition's leader, in one batch; the first record's offset. Blocks.
/// Panics saying what failed: the metadata, the connection, or the broker's
/// error code.
pub(crate) fn produce(
    brokers: &str,
    topic: &str,
    partition: i32,
    records: &[RawRecord<'_>],
) -> i64 {
    assert!(!records.is_empty(), "a batch holds one record at least");
    let leader = leader(brokers, topic, partition);
    let mut stream = TcpStream::connect(&leader)
        .unwrap_or_else(|e| panic!("connecting to {leader}, leader of {topic}/{partition}: {e}"));
    stream
        .set_read_timeout(Some(TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(TIMEOUT))
        .expect("write timeout");
    let request = produce_request(topic, partition, &record_batch(records));
    stream
        .write_all(&request)
        .unwrap_or_else(|e| panic!("sending the Produce request to {leader}: {e}"));
    let mut size = [0u8; 4];
    stream
        .read_exact(&mut size)
        .unwrap_or_else(|e| panic!("no answer to the Produce request from {leader}: {e}"));
    let mut response = vec![0u8; i32::from_be_bytes(size) as usize];
    stream
        .read_exact(&mut response)
        .unwrap_or_else(|e| panic!("a short answer to the Produce request from {leader}: {e}"));
    let (error, offset) = produce_response(&response, topic, partition);
    assert_eq!(
        error, 0,
        "the broker refused the batch for {topic}/{partition} with error code {error}"
    );
    offset
}

/// `host:port` of the leader of `topic`/`partition`.
fn leader(brokers: &str, topic: &str, partition: i32) -> String {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("a metadata client");
    let metadata = client
        .fetch_metadata(Some(topic), TIMEOUT)
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let leader = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .and_then(|t| t.partitions().iter().find(|p| p.id() == partition))
        .unwrap_or_else(|| panic!("no partition {topic}/{partition} in the metadata"))
        .leader();
    let broker = metadata
        .brokers()
        .iter()
        .find(|b| b.id() == leader)
        .unwrap_or_else(|| panic!("leader {leader} of {topic}/{partition} not among the brokers"));
    format!("{}:{}", broker.host(), broker.port())
}

/// A Produce v3 request of `batch` for `topic`/`partition`, with its size.
fn produce_request(topic: &str, partition: i32, batch: &[u8]) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend(0i16.to_be_bytes()); // Produce
    r.extend(3i16.to_be_bytes()); // version
    r.extend(CORRELATION.to_be_bytes());
    string(&mut r, b"eventbus-raw-produce"); // client id
    r.extend((-1i16).to_be_bytes()); // transactional id: none
    r.extend((-1i16).to_be_bytes()); // acks: all replicas
    r.extend((TIMEOUT.as_millis() as i32).to_be_bytes());
    r.extend(1i32.to_be_bytes()); // topics
    string(&mut r, topic.as_bytes());
    r.extend(1i32.to_be_bytes()); // partitions
    r.extend(partition.to_be_bytes());
    r.extend((batch.len() as i32).to_be_bytes());
    r.extend(batch);
    let mut framed = (r.len() as i32).to_be_bytes().to_vec();
    framed.extend(r);
    framed
}

/// The error code and base offset a Produce v3 response gives
/// `topic`/`partition`.
fn produce_response(mut r: &[u8], topic: &str, partition: i32) -> (i16, i64) {
    let correlation = i32::from_be_bytes(take(&mut r));
    assert_eq!(correlation, CORRELATION, "the answer to another request");
    let topics = i32::from_be_bytes(take(&mut r));
    for _ in 0..topics {
        let len = i16::from_be_bytes(take(&mut r)) as usize;
        let name = r[..len].to_vec();
        r = &r[len..];
        let partitions = i32::from_be_bytes(take(&mut r));
        for _ in 0..partitions {
            let index = i32::from_be_bytes(take(&mut r));
            let error = i16::from_be_bytes(take(&mut r));
            let base_offset = i64::from_be_bytes(take(&mut r));
            let _log_append_time = i64::from_be_bytes(take::<8>(&mut r));
            if name == topic.as_bytes() && index == partition {
                return (error, base_offset);
            }
        }
    }
    panic!("the Produce response does not answer for {topic}/{partition}")
}

/// The next `N` bytes of `r`.
fn take<const N: usize>(r: &mut &[u8]) -> [u8; N] {
    assert!(r.len() >= N, "the Produce response ends early");
    let (head, rest) = r.split_at(N);
    *r = rest;
    head.try_into().expect("N bytes")
}

/// A record batch of magic 2 holding `records`, uncompressed, stamped now.
fn record_batch(records: &[RawRecord<'_>]) -> Vec<u8> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as i64;
    // From the attributes on: what the CRC covers.
    let mut body = Vec::new();
    body.extend(0i16.to_be_bytes()); // attributes: no compression, create time
    body.extend((records.len() as i32 - 1).to_be_bytes()); // last offset delta
    body.extend(now.to_be_bytes()); // base timestamp
    body.extend(now.to_be_bytes()); // max timestamp
    body.extend((-1i64).to_be_bytes()); // producer id: none
    body.extend((-1i16).to_be_bytes()); // producer epoch
    body.extend((-1i32).to_be_bytes()); // base sequence
    body.extend((records.len() as i32).to_be_bytes());
    for (delta, record) in records.iter().enumerate() {
        let mut rec = vec![0u8]; // attributes
        varint(&mut rec, 0); // timestamp delta
        varint(&mut rec, delta as i64); // offset delta
        match record.key {
            Some(key) => bytes(&mut rec, key),
            None => varint(&mut rec, -1),
        }
        bytes(&mut rec, record.value);
        varint(&mut rec, record.headers.len() as i64);
        for (name, value) in record.headers {
            bytes(&mut rec, name);
            bytes(&mut rec, value);
        }
        varint(&mut body, rec.len() as i64);
        body.extend(rec);
    }
    let mut batch = Vec::new();
    // The base offset is the broker's to set; the length counts from the
    // partition leader epoch on: epoch, magic, CRC, body.
    batch.extend(0i64.to_be_bytes());
    batch.extend(((4 + 1 + 4 + body.len()) as i32).to_be_bytes());
    batch.extend((-1i32).to_be_bytes()); // partition leader epoch
    batch.push(2); // magic
    batch.extend(crc32c(&body).to_be_bytes());
    batch.extend(body);
    batch
}

/// A protocol string: its length as an i16, then its bytes.
fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend((s.len() as i16).to_be_bytes());
    out.extend(s);
}

/// Bytes in a record: their length as a varint, then the bytes.
fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    varint(out, b.len() as i64);
    out.extend(b);
}

/// `n` zigzag-encoded, seven bits a byte, low bits first.
fn varint(out: &mut Vec<u8>, n: i64) {
    let mut v = ((n << 1) ^ (n >> 63)) as u64;
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// CRC-32C (Castagnoli), as record batches carry it. A few bytes per test
/// record: bit by bit is enough.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn crc32c_of_the_check_string() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}

#[test]
fn varints_are_zigzag_encoded() {
    let encode = |n| {
        let mut out = Vec::new();
        varint(&mut out, n);
        out
    };
    assert_eq!(encode(0), [0]);
    assert_eq!(encode(-1), [1]);
    assert_eq!(encode(1), [2]);
    assert_eq!(encode(64), [0x80, 1]);
}
