//! q2q: networking addressed to people.
