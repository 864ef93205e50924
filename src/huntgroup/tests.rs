//! Unit tests of the hunt loop with an in-process leg (no SIP): queue order, ring-no-answer,
//! wrap-up, abandonment, overflow; on tokio's paused clock where timing matters.
