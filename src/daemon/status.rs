//! `q2q-tun status`: what the daemon answers (a box of text fields, one tab-separated line
//! per peer session) and the table it prints as. The lab scripts read the table: its
//! columns stay as they are. `status --json` is the same [`Status`] as JSON (serde field names).

use super::{DaemonError, control, tun};
use crate::client::Home;
use crate::presence::node::Node;
use crate::presence::session::Traffic;
use std::fmt;

/// Ask the running daemon of `home` for its status.
///
/// # Errors
/// As [`control::ask`]: [`DaemonError::NotRunning`] when no daemon answers.
pub async fn ask(home: &Home) -> Result<Status, DaemonError> {
    let answer = control::ask(home, &control::StatusAsk {}).await?;
    Ok(Status::from_answer(&answer))
}

/// The state of a running daemon.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Status {
    /// Who it runs as, like `alice@example.com` (None: the answer lacked it).
    pub address: Option<String>,
    /// Its UDP socket, `ip:port`.
    pub udp: Option<String>,
    /// TUN mode's summary (device, addresses, resolver); None without the device.
    pub tun: Option<String>,
    /// The TUN device's name, like `q2q0`; None without the device.
    pub tun_device: Option<String>,
    /// Where the resolver shim answers, `ip:53`; None without the device.
    pub dns: Option<String>,
    /// The certificate in use: when it expires and renews, and a warning when renewal is
    /// failing or expiry is near ([`crate::presence::node::CertificateStatus::describe`]).
    pub certificate: Vec<String>,
    /// The router's port mapping for our UDP socket (`ip:port via PROTOCOL`), when `up
    /// --port-mapping` got one.
    pub port_mapping: Option<String>,
    /// One entry per peer session, oldest first.
    pub peers: Vec<PeerLine>,
}

/// One peer session as `status` shows it; every stream with that person shares it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PeerLine {
    /// The other person.
    pub peer: String,
    /// Streams open now.
    pub streams: String,
    /// Streams opened so far, by service: `tcp/22:3,ping:1`, or `-`.
    pub opened: String,
    /// The path: direct ip:port, UDP relay or TCP relay.
    pub path: String,
    /// Why that path.
    pub why: String,
    /// Round trip, path MTU, bytes each way, retransmissions (sampled once a second; `None`
    /// before the first sample).
    pub traffic: Option<Traffic>,
}

impl Status {
    /// The state of `node` and its TUN mode, if any.
    pub fn of(node: &Node, tun: Option<&tun::Running>) -> Status {
        let peers = node
            .status()
            .into_iter()
            .map(|p| {
                let opened: Vec<String> =
                    p.opened.iter().map(|(s, n)| format!("{s}:{n}")).collect();
                PeerLine {
                    peer: p.peer.to_string(),
                    streams: p.streams.to_string(),
                    opened: if opened.is_empty() { "-".to_string() } else { opened.join(",") },
                    path: p.path.to_string(),
                    why: p.why,
                    traffic: p.traffic,
                }
            })
            .collect();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Status {
            address: Some(node.address().to_string()),
            udp: Some(node.local_addr().to_string()),
            tun: tun.map(|t| t.summary.clone()),
            tun_device: tun.map(|t| t.device.clone()),
            dns: tun.map(|t| t.dns_addr.to_string()),
            certificate: node.certificate_status().describe(now),
            port_mapping: node.port_mapping().map(|m| format!("{} via {}", m.external, m.protocol)),
            peers,
        }
    }

    /// As the daemon answers it: every field present, empty when absent; `peers` one line
    /// per session, its five fields separated by tabs, then the eight numbers of its
    /// [`Traffic`] when sampled.
    pub fn to_answer(&self) -> control::StatusAnswer {
        let lines: Vec<String> = self
            .peers
            .iter()
            .map(|p| {
                let mut line =
                    format!("{}\t{}\t{}\t{}\t{}", p.peer, p.streams, p.opened, p.path, p.why);
                if let Some(t) = &p.traffic {
                    let n = [
                        t.rtt_us,
                        t.path_mtu,
                        t.bytes_sent,
                        t.bytes_received,
                        t.packets_sent,
                        t.retransmits,
                        t.sending_bps,
                        t.receiving_bps,
                    ];
                    line = format!("{line}\t{}", n.map(|v| v.to_string()).join("\t"));
                }
                line
            })
            .collect();
        let or_empty = |v: &Option<String>| Some(v.clone().unwrap_or_default());
        control::StatusAnswer {
            address: or_empty(&self.address),
            udp: or_empty(&self.udp),
            peers: Some(lines.join("\n")),
            tun: or_empty(&self.tun),
            tun_device: or_empty(&self.tun_device),
            dns: or_empty(&self.dns),
            certificate: Some(self.certificate.join("\n")),
            port_mapping: or_empty(&self.port_mapping),
        }
    }

    /// Read the daemon's answer; empty fields are absent, peer lines without five fields
    /// (or five and the eight numbers of their traffic) are skipped.
    pub fn from_answer(a: &control::StatusAnswer) -> Status {
        let field = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        let peers = a
            .peers
            .as_deref()
            .unwrap_or("")
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split('\t').collect();
                let (text, numbers) = fields.split_at_checked(5)?;
                let traffic = match numbers {
                    [] => None,
                    [rtt, mtu, sent, received, packets, retransmits, sending, receiving] => {
                        let n = |v: &str| v.parse::<u64>().ok();
                        Some(Traffic {
                            rtt_us: n(rtt)?,
                            path_mtu: n(mtu)?,
                            bytes_sent: n(sent)?,
                            bytes_received: n(received)?,
                            packets_sent: n(packets)?,
                            retransmits: n(retransmits)?,
                            sending_bps: n(sending)?,
                            receiving_bps: n(receiving)?,
                        })
                    }
                    _ => return None,
                };
                let [peer, streams, opened, path, why] = text else { return None };
                Some(PeerLine {
                    peer: peer.to_string(),
                    streams: streams.to_string(),
                    opened: opened.to_string(),
                    path: path.to_string(),
                    why: why.to_string(),
                    traffic,
                })
            })
            .collect();
        Status {
            address: field(&a.address),
            udp: field(&a.udp),
            tun: field(&a.tun),
            tun_device: field(&a.tun_device),
            dns: field(&a.dns),
            port_mapping: field(&a.port_mapping),
            certificate: a
                .certificate
                .as_deref()
                .unwrap_or("")
                .lines()
                .map(str::to_string)
                .collect(),
            peers,
        }
    }
}

/// The printed status: who and where, the device, then a table of peer sessions.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_unknown = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".to_string());
        writeln!(f, "{} (UDP {})", or_unknown(&self.address), or_unknown(&self.udp))?;
        match &self.tun {
            Some(t) => writeln!(f, "{t}")?,
            None => writeln!(f, "no TUN device (--no-tun)")?,
        }
        for line in &self.certificate {
            writeln!(f, "{line}")?;
        }
        if let Some(m) = &self.port_mapping {
            writeln!(f, "port mapping {m}")?;
        }
        if self.peers.is_empty() {
            return writeln!(f, "no peers yet");
        }
        writeln!(f, "{:<28} {:<7} {:<20} {:<32} why", "peer", "streams", "opened", "path")?;
        for p in &self.peers {
            let PeerLine { peer, streams, opened, path, why, traffic } = p;
            writeln!(f, "{peer:<28} {streams:<7} {opened:<20} {path:<32} {why}")?;
            // On a line of its own, indented: scripts that read a peer's row by its first
            // column see the table as before.
            if let Some(t) = traffic {
                writeln!(f, "  {}", TrafficLine(t))?;
            }
        }
        Ok(())
    }
}

/// A peer's [`Traffic`] as `status` prints it under the peer's row.
struct TrafficLine<'a>(&'a Traffic);

impl fmt::Display for TrafficLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        let retx = if t.packets_sent == 0 {
            0.0
        } else {
            t.retransmits as f64 * 100.0 / t.packets_sent as f64
        };
        write!(
            f,
            "round trip {:.1} ms, path MTU {} bytes, sent {}, received {}, retransmitted {retx:.2}% of {} datagrams; now {} out, {} in",
            t.rtt_us as f64 / 1000.0,
            t.path_mtu,
            indicatif::HumanBytes(t.bytes_sent),
            indicatif::HumanBytes(t.bytes_received),
            t.packets_sent,
            BitRate(t.sending_bps),
            BitRate(t.receiving_bps),
        )
    }
}

/// Bits per second in decimal units, as links are rated: `950 bit/s`, `3.21 Gbit/s`.
struct BitRate(u64);

impl fmt::Display for BitRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 1_000 {
            return write!(f, "{} bit/s", self.0);
        }
        let (mut value, mut unit) = (self.0 as f64 / 1e3, "k");
        for next in ["M", "G", "T"] {
            if value < 1e3 {
                break;
            }
            (value, unit) = (value / 1e3, next);
        }
        write!(f, "{value:.2} {unit}bit/s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_box_round_trips_and_prints_as_before() {
        let s = Status {
            address: Some("bob@example.com".into()),
            udp: Some("0.0.0.0:4000".into()),
            tun: None,
            tun_device: None,
            dns: None,
            port_mapping: None,
            certificate: vec![
                "certificate bob@example.com (serial 6b68a236): expires 2026-12-30 15:22 UTC"
                    .into(),
                "warning: the certificate of bob@example.com expires in 6 days".into(),
            ],
            peers: vec![PeerLine {
                peer: "alice@example.com".into(),
                streams: "1".into(),
                opened: "tcp/22:1".into(),
                path: "direct 192.0.2.1:5000".into(),
                why: "probe answered".into(),
                traffic: Some(Traffic {
                    rtt_us: 21_400,
                    path_mtu: 1452,
                    bytes_sent: 3 << 30,
                    bytes_received: 5 << 20,
                    packets_sent: 2_000_000,
                    retransmits: 1_000,
                    sending_bps: 3_210_000_000,
                    receiving_bps: 950,
                }),
            }],
        };
        let b = crate::proto::Message::to_box(&s.to_answer());
        assert_eq!(b.get_str("tun"), Some(""), "every field is there");
        let back = crate::proto::Message::from_box(&b).unwrap();
        assert_eq!(Status::from_answer(&back), s);
        let printed = s.to_string();
        let lines: Vec<&str> = printed.lines().collect();
        assert_eq!(lines[0], "bob@example.com (UDP 0.0.0.0:4000)");
        assert_eq!(lines[1], "no TUN device (--no-tun)");
        assert!(lines[2].starts_with("certificate bob@example.com"), "{printed}");
        assert!(lines[3].starts_with("warning: "), "{printed}");
        assert!(lines[4].starts_with("peer ") && lines[4].ends_with(" why"), "{printed}");
        assert_eq!(lines[5].split_whitespace().next(), Some("alice@example.com"));
        assert_eq!(
            lines[6],
            "  round trip 21.4 ms, path MTU 1452 bytes, sent 3.00 GiB, received 5.00 MiB, \
             retransmitted 0.05% of 2000000 datagrams; now 3.21 Gbit/s out, 950 bit/s in"
        );
        let j = serde_json::to_value(&s).unwrap();
        assert_eq!(j["address"], "bob@example.com");
        assert_eq!(j["tun"], serde_json::Value::Null);
        assert_eq!(j["peers"][0]["path"], "direct 192.0.2.1:5000");
        assert_eq!(j["peers"][0]["traffic"]["bytes_received"], 5 << 20);
        assert_eq!(
            j["certificate"][1],
            "warning: the certificate of bob@example.com expires in 6 days"
        );
        assert_eq!(
            Status::from_answer(
                &crate::proto::Message::from_box(&crate::amp::AmpBox::new()).unwrap()
            )
            .to_string(),
            "? (UDP ?)\nno TUN device (--no-tun)\nno peers yet\n"
        );
    }

    #[test]
    fn peer_lines_are_read_with_or_without_traffic_and_bad_ones_skipped() {
        let answer = |peers: &str| control::StatusAnswer {
            peers: Some(peers.to_string()),
            ..Status::default().to_answer()
        };
        let row = "bob@example.com\t0\t-\tUDP relay 198.51.100.1:8788\tno direct path";
        let read = |peers: &str| Status::from_answer(&answer(peers)).peers;
        // Before the first sample: no traffic, the row still shown.
        assert_eq!(read(row)[0].traffic, None);
        let t = read(&format!("{row}\t900\t1200\t10\t20\t1\t0\t80\t160"))[0].traffic;
        assert_eq!(
            t.map(|t| (t.rtt_us, t.path_mtu, t.bytes_received, t.receiving_bps)),
            Some((900, 1200, 20, 160))
        );
        // Too few numbers, too many, or one that is not a number: the line is skipped.
        for bad in [
            "\t900\t1200",
            "\t1\t2\t3\t4\t5\t6",
            "\t1\t2\t3\t4\t5\t6\t7\t8\t9",
            "\t1\t2\t3\t4\t5\t6\t7\teight",
            "\t1\t2\t3\t4\t5\t6\t7\t-8",
        ] {
            assert!(read(&format!("{row}{bad}")).is_empty(), "{bad}");
        }
        assert!(read("a\tb\tc").is_empty());
    }

    #[test]
    fn rates_come_from_the_sample_before() {
        let before = Traffic { bytes_sent: 1_000, bytes_received: 5_000, ..Default::default() };
        let mut now = Traffic { bytes_sent: 126_000, bytes_received: 5_000, ..Default::default() };
        now.rates_since(&before, std::time::Duration::from_millis(500));
        assert_eq!((now.sending_bps, now.receiving_bps), (2_000_000, 0));
        // Counters of a new session (smaller than before) give no rate, not a huge one;
        // too short an interval gives none at all.
        let mut fresh = Traffic { bytes_sent: 10, ..Default::default() };
        fresh.rates_since(&now, std::time::Duration::from_secs(1));
        assert_eq!(fresh.sending_bps, 0);
        let mut quick = now;
        quick.sending_bps = 0;
        quick.rates_since(&before, std::time::Duration::from_micros(999));
        assert_eq!(quick.sending_bps, 0);
        let rates: Vec<String> = [0, 999, 1_000, 12_345_678, 3_210_000_000]
            .iter()
            .map(|&b| BitRate(b).to_string())
            .collect();
        assert_eq!(rates, ["0 bit/s", "999 bit/s", "1.00 kbit/s", "12.35 Mbit/s", "3.21 Gbit/s"]);
    }
}
