//! Helpers for Herald end-to-end tests: start real servers and agents, await conditions.
