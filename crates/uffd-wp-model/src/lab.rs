//! Scenario labs on the model (placeholder, filled below).
