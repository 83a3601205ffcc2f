//! PTCP: the tokio driver of the q2q-netstack sessions, the stream type, and TLS on streams.
