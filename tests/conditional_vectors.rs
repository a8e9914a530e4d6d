//! Placeholder until the conditional suite lands.
