//! Tests of the NATS backend against a real `nats-server` started per test.

mod common;

mod auth_server;
mod basics;
mod conformance;
mod dead_letters;
mod given_back;
mod handover;
mod heartbeats;
mod inspect;
mod lease_loss;
mod liveness;
mod members;
mod offset_reset;
mod out_of_service;
mod partition_fault;
mod partitioned;
mod poison;
mod redrive;
mod restart;
mod retention;
mod sequencing;
mod streams;
mod stuck;
mod takeover_failure;
