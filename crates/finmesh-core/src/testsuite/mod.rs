//! The conformance suite (placeholder; filled in by the suite work).
