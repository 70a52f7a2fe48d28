//! Health reports.

use std::fmt;

/// Overall state, ordered from best to worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HealthStatus {
    /// Working normally.
    Healthy,
    /// Working, with a problem worth a look (lag, stuck key, restarts).
    Degraded,
    /// Not doing its job.
    Unhealthy,
}

impl fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthStatus::Healthy => "healthy",
            HealthStatus::Degraded => "degraded",
            HealthStatus::Unhealthy => "unhealthy",
        })
    }
}

/// One component's health with the reason in words.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ComponentHealth {
    /// Component name, e.g. `pool.keyed`, `broker`, `consumer.orders`.
    pub name: String,
    /// Its state.
    pub status: HealthStatus,
    /// Why, when not healthy.
    pub reason: Option<String>,
}

impl ComponentHealth {
    /// A healthy component.
    pub fn healthy(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: HealthStatus::Healthy,
            reason: None,
        }
    }

    /// A component in `status` because of `reason`.
    pub fn with_status(
        name: impl Into<String>,
        status: HealthStatus,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            name: name.into(),
            status,
            reason: Some(reason.into()),
        }
    }
}

/// The bus's health: the worst component decides the overall status.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HealthReport {
    /// Worst status of all components.
    pub status: HealthStatus,
    /// Every component.
    pub components: Vec<ComponentHealth>,
}

impl HealthReport {
    /// Combine components.
    pub fn from_components(components: Vec<ComponentHealth>) -> Self {
        let status = components
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(HealthStatus::Healthy);
        Self { status, components }
    }

    /// The component called `name`.
    pub fn component(&self, name: &str) -> Option<&ComponentHealth> {
        self.components.iter().find(|c| c.name == name)
    }
}
