//! The answerer: DNS query bytes in, response bytes out. No sockets, no clock.
//!
//! | question                                   | answer                                       |
//! |--------------------------------------------|----------------------------------------------|
//! | `A`/`AAAA`/`ANY` for a known person        | the pool's addresses, TTL [`ShimConfig::ttl`] |
//! | other types for a known person             | NOERROR, no data, SOA                         |
//! | an unknown person or a malformed `*.q2q`   | NXDOMAIN with the `q2q.` SOA (negative TTL)   |
//! | identity server unsure, no mapping yet     | SERVFAIL (the resolver retries)               |
//! | too many lookups in flight, no mapping yet | SERVFAIL                                      |
//! | `PTR` for a mapped pool address            | `alice.example.com.q2q.`                      |
//! | an unmapped pool address                   | NXDOMAIN                                      |
//! | anything else (`example.com`, other arpa)  | REFUSED: never answered as ours               |
//! | unparseable query with a header            | FORMERR; a response or < 12 bytes: nothing   |
//!
//! Whether a person exists is asked of an [`Exists`], which answers at once from what it
//! knows (the daemon: its cache). When it does not know ([`Existence::Ask`]), the answer
//! waits: [`Shim::start`] gives back a [`Pending`] query, the server asks the identity
//! service with no lock held and [`Shim::finish`] completes it. So a slow domain never holds
//! up an answer about anyone else, and the answerer itself still does no I/O.

use super::names::{self, Names, Parsed};
use super::pool::Pool;
use crate::address::Q2qAddress;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SOA};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

/// What the identity service says about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existence {
    /// Registered: answer with addresses.
    Known,
    /// Not registered (or its domain has no q2q server): NXDOMAIN.
    Unknown,
    /// No answer right now (server unreachable, still asking): use an existing mapping if
    /// there is one, else SERVFAIL.
    Unsure,
    /// Not known here: the identity service must be asked (see [`Shim::start`]). Where
    /// nobody asks (the one-step [`Shim::answer`]) it counts as [`Existence::Unsure`].
    Ask,
}

/// Whether a person exists, from what is known now. Called with the shim locked: it must
/// answer at once (a cache look-up), never wait on the network; [`Existence::Ask`] defers
/// the question to the server's look-up, made with no lock held.
pub trait Exists {
    fn exists(&mut self, address: &Q2qAddress) -> Existence;
}

impl<F: FnMut(&Q2qAddress) -> Existence> Exists for F {
    fn exists(&mut self, address: &Q2qAddress) -> Existence {
        self(address)
    }
}

/// Answer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShimConfig {
    /// TTL of positive answers (short: mappings outlive it by far).
    pub ttl: u32,
    /// TTL of negative answers (SOA minimum), so a newly registered user appears quickly.
    pub negative_ttl: u32,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig { ttl: 5, negative_ttl: 5 }
    }
}

/// Largest UDP response we offer to send with EDNS (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;

/// The sans-IO resolver shim: names, pool and the existence oracle.
pub struct Shim<E> {
    names: Names,
    pool: Pool,
    exists: E,
    config: ShimConfig,
}

/// What [`Shim::start`] made of a query.
#[derive(Debug)]
pub enum Step {
    /// Send this (`None`: send nothing).
    Reply(Option<Vec<u8>>),
    /// The answer depends on whether this person exists, which nobody here knows yet: ask,
    /// then [`Shim::finish`].
    Ask(Box<Pending>),
}

/// A query waiting for an answer about existence.
#[derive(Debug)]
pub struct Pending {
    address: Q2qAddress,
    question: Query,
    response: Message,
    /// The largest response the client takes over UDP; `None` over TCP.
    udp_limit: Option<usize>,
}

impl Pending {
    /// Whom to ask about.
    pub fn address(&self) -> &Q2qAddress {
        &self.address
    }
}

/// What a question is about.
enum Subject {
    Forward(Parsed),
    /// A full reverse name for an address inside the pool, with its zone (the name cut at
    /// the pool prefix, rounded to a label boundary).
    Reverse(IpAddr, Name),
    NotOurs,
}

impl<E: Exists> Shim<E> {
    pub fn new(names: Names, pool: Pool, exists: E, config: ShimConfig) -> Shim<E> {
        Shim { names, pool, exists, config }
    }

    pub fn names(&self) -> &Names {
        &self.names
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// For the daemon: `touch` on traffic, saving, `whois`.
    pub fn pool_mut(&mut self) -> &mut Pool {
        &mut self.pool
    }

    pub fn exists_mut(&mut self) -> &mut E {
        &mut self.exists
    }

    /// Answer a query that came over UDP: the response fits the client's advertised size
    /// (512 bytes, or its EDNS payload up to 1232), else it is truncated with TC set.
    /// `None` means send nothing. In one step: [`Existence::Ask`] counts as unsure.
    pub fn answer(&mut self, query: &[u8], now: SystemTime) -> Option<Vec<u8>> {
        let step = self.start(query, now, true);
        self.settle(step, now)
    }

    /// Answer a query that came over TCP (no size limit but the 64 KiB frame).
    pub fn answer_tcp(&mut self, query: &[u8], now: SystemTime) -> Option<Vec<u8>> {
        let step = self.start(query, now, false);
        self.settle(step, now)
    }

    fn settle(&mut self, step: Step, now: SystemTime) -> Option<Vec<u8>> {
        match step {
            Step::Reply(r) => r,
            Step::Ask(p) => self.finish(*p, Existence::Unsure, now),
        }
    }

    /// Begin answering a query (`udp`: it came over UDP, see [`Shim::answer`]). Everything
    /// but a person [`Exists`] does not know yet is answered here and now.
    pub fn start(&mut self, query: &[u8], now: SystemTime, udp: bool) -> Step {
        let Some(header) = query.get(..12) else { return Step::Reply(None) };
        // QR set: a response, perhaps reflected at us. Never answer it.
        if header[2] & 0x80 != 0 {
            return Step::Reply(None);
        }
        let Ok(msg) = Message::from_vec(query) else { return Step::Reply(Some(form_err(header))) };
        if msg.metadata.message_type != MessageType::Query {
            return Step::Reply(None);
        }
        let mut resp = Message::response(msg.metadata.id, msg.metadata.op_code);
        resp.metadata.recursion_desired = msg.metadata.recursion_desired;
        resp.metadata.checking_disabled = msg.metadata.checking_disabled;
        if msg.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(EDNS_PAYLOAD);
            resp.set_edns(edns);
        }
        let udp_limit = udp.then(|| usize::from(msg.max_payload().min(EDNS_PAYLOAD)));
        if msg.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
        } else if let [q] = msg.queries.as_slice() {
            resp.add_query(q.clone());
            if let Some(address) = self.answer_question(q, now, &mut resp) {
                let pending = Pending { address, question: q.clone(), response: resp, udp_limit };
                return Step::Ask(Box::new(pending));
            }
        } else {
            resp.metadata.response_code = ResponseCode::FormErr;
        }
        Step::Reply(encode(resp, udp_limit))
    }

    /// Complete a [`Pending`] query with what the identity service said
    /// ([`Existence::Ask`] again counts as unsure).
    pub fn finish(
        &mut self,
        pending: Pending,
        existence: Existence,
        now: SystemTime,
    ) -> Option<Vec<u8>> {
        let Pending { address, question, mut response, udp_limit } = pending;
        self.answer_person(&question, address, existence, now, &mut response);
        encode(response, udp_limit)
    }

    /// Fill in `resp`, or return the person whose existence must be asked first.
    fn answer_question(
        &mut self,
        q: &Query,
        now: SystemTime,
        resp: &mut Message,
    ) -> Option<Q2qAddress> {
        if q.query_class != DNSClass::IN {
            resp.metadata.response_code = ResponseCode::Refused;
            return None;
        }
        match self.classify(&q.name) {
            Subject::NotOurs => resp.metadata.response_code = ResponseCode::Refused,
            Subject::Forward(parsed) => {
                resp.metadata.authoritative = true;
                return self.forward(q, parsed, now, resp);
            }
            Subject::Reverse(ip, zone) => {
                resp.metadata.authoritative = true;
                match self.pool.whois(ip) {
                    Some(who) => {
                        if matches!(q.query_type, RecordType::PTR | RecordType::ANY) {
                            let target = names::dns_name(who);
                            let rdata = RData::PTR(PTR(target));
                            resp.add_answer(Record::from_rdata(
                                q.name.clone(),
                                self.config.ttl,
                                rdata,
                            ));
                        } else {
                            resp.add_authority(self.soa(zone));
                        }
                    }
                    None => {
                        resp.metadata.response_code = ResponseCode::NXDomain;
                        resp.add_authority(self.soa(zone));
                    }
                }
            }
        }
        None
    }

    fn forward(
        &mut self,
        q: &Query,
        parsed: Parsed,
        now: SystemTime,
        resp: &mut Message,
    ) -> Option<Q2qAddress> {
        let apex = names::apex();
        let address = match parsed {
            Parsed::NotOurs => {
                resp.metadata.authoritative = false;
                resp.metadata.response_code = ResponseCode::Refused;
                return None;
            }
            Parsed::Apex => {
                if matches!(q.query_type, RecordType::SOA | RecordType::ANY) {
                    let mut soa = self.soa(apex);
                    soa.name = q.name.clone();
                    resp.add_answer(soa);
                } else {
                    resp.add_authority(self.soa(apex));
                }
                return None;
            }
            Parsed::Malformed => {
                resp.metadata.response_code = ResponseCode::NXDomain;
                resp.add_authority(self.soa(apex));
                return None;
            }
            Parsed::Address(a) => a,
        };
        match self.exists.exists(&address) {
            Existence::Ask => Some(address),
            known => {
                self.answer_person(q, address, known, now, resp);
                None
            }
        }
    }

    /// Answer about a person, given whether they exist.
    fn answer_person(
        &mut self,
        q: &Query,
        address: Q2qAddress,
        existence: Existence,
        now: SystemTime,
        resp: &mut Message,
    ) {
        let apex = names::apex();
        let mapping = match existence {
            Existence::Unknown => {
                tracing::debug!(%address, "unknown: NXDOMAIN");
                resp.metadata.response_code = ResponseCode::NXDomain;
                resp.add_authority(self.soa(apex));
                return;
            }
            Existence::Unsure | Existence::Ask => match self.pool.get(&address) {
                Some(m) => {
                    self.pool.touch(IpAddr::V4(m.ipv4), now);
                    m
                }
                None => {
                    tracing::debug!(%address, "existence unsure, no mapping: SERVFAIL");
                    resp.metadata.response_code = ResponseCode::ServFail;
                    return;
                }
            },
            Existence::Known => {
                let wants_addresses =
                    matches!(q.query_type, RecordType::A | RecordType::AAAA | RecordType::ANY);
                if !wants_addresses {
                    resp.add_authority(self.soa(apex));
                    return;
                }
                match self.pool.lookup(&address, now) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(%address, error = %e, "no virtual address: SERVFAIL");
                        resp.metadata.response_code = ResponseCode::ServFail;
                        return;
                    }
                }
            }
        };
        let ttl = self.config.ttl;
        let name = q.name.clone();
        let mut any = false;
        if matches!(q.query_type, RecordType::A | RecordType::ANY) {
            resp.add_answer(Record::from_rdata(name.clone(), ttl, RData::A(A(mapping.ipv4))));
            any = true;
        }
        if matches!(q.query_type, RecordType::AAAA | RecordType::ANY) {
            resp.add_answer(Record::from_rdata(name, ttl, RData::AAAA(AAAA(mapping.ipv6))));
            any = true;
        }
        if !any {
            resp.add_authority(self.soa(apex));
        }
    }

    fn soa(&self, zone: Name) -> Record {
        let apex = names::apex();
        let rname = Name::from_labels([&b"hostmaster"[..], names::TLD.as_bytes()])
            .unwrap_or_else(|_| apex.clone());
        let n = self.config.negative_ttl;
        let soa = SOA::new(apex, rname, 1, 3600, 600, 86400, n);
        Record::from_rdata(zone, n, RData::SOA(soa))
    }

    fn classify(&self, name: &Name) -> Subject {
        let labels: Vec<&[u8]> = name.iter().collect();
        match labels.as_slice() {
            [rest @ .., a, b] if b.eq_ignore_ascii_case(b"arpa") => {
                let v4 = a.eq_ignore_ascii_case(b"in-addr");
                let v6 = a.eq_ignore_ascii_case(b"ip6");
                let ip = if v4 {
                    reverse_v4(rest).map(IpAddr::V4)
                } else if v6 {
                    reverse_v6(rest).map(IpAddr::V6)
                } else {
                    None
                };
                let Some(ip) = ip.filter(|ip| self.pool.contains(*ip)) else {
                    return Subject::NotOurs;
                };
                // The zone keeps the labels covering the pool prefix (rounded up).
                let keep = match ip {
                    IpAddr::V4(_) => usize::from(self.pool.config().ipv4.prefix_len()).div_ceil(8),
                    IpAddr::V6(_) => usize::from(self.pool.config().ipv6.prefix_len()).div_ceil(4),
                };
                let zone_labels = rest.len().saturating_sub(keep);
                let zone = Name::from_labels(labels[zone_labels..].iter().copied())
                    .unwrap_or_else(|_| name.clone());
                Subject::Reverse(ip, zone)
            }
            _ => Subject::Forward(self.names.parse_labels(labels.iter().copied())),
        }
    }
}

/// `w.z.y.x` labels (least significant first) of `x.y.z.w`, canonical decimal only.
fn reverse_v4(labels: &[&[u8]]) -> Option<Ipv4Addr> {
    let [d, c, b, a] = labels else { return None };
    let octet = |l: &[u8]| -> Option<u8> {
        let canonical = !l.is_empty()
            && l.len() <= 3
            && l.iter().all(u8::is_ascii_digit)
            && (l.len() == 1 || l[0] != b'0');
        if !canonical {
            return None;
        }
        std::str::from_utf8(l).ok()?.parse().ok()
    };
    Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
}

/// 32 nibble labels, least significant first.
fn reverse_v6(labels: &[&[u8]]) -> Option<Ipv6Addr> {
    if labels.len() != 32 {
        return None;
    }
    let mut v: u128 = 0;
    for l in labels.iter().rev() {
        let [c] = l else { return None };
        let nibble = (*c as char).to_digit(16)?;
        v = (v << 4) | u128::from(nibble);
    }
    Some(Ipv6Addr::from(v))
}

/// The response's bytes; over UDP (`udp_limit`) truncated with TC set when too long.
fn encode(resp: Message, udp_limit: Option<usize>) -> Option<Vec<u8>> {
    let bytes = resp.to_vec().ok()?;
    match udp_limit {
        Some(limit) if bytes.len() > limit => resp.truncate().to_vec().ok(),
        _ => Some(bytes),
    }
}

/// A bare FORMERR header echoing the query's id, opcode and RD bit.
fn form_err(header: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 12];
    out[..2].copy_from_slice(&header[..2]);
    out[2] = 0x80 | (header[2] & 0x79); // QR, opcode, RD
    out[3] = 1; // FORMERR
    out
}

/// The reverse name of an address (`d.c.b.a.in-addr.arpa.` for a.b.c.d, nibbles for IPv6).
pub fn reverse_name(ip: IpAddr) -> Name {
    let mut labels: Vec<String> = match ip {
        IpAddr::V4(v4) => v4.octets().iter().rev().map(u8::to_string).collect(),
        IpAddr::V6(v6) => {
            let v = u128::from(v6);
            (0..32).map(|i| format!("{:x}", (v >> (4 * i)) & 0xf)).collect()
        }
    };
    labels.push(if ip.is_ipv4() { "in-addr" } else { "ip6" }.into());
    labels.push("arpa".into());
    Name::from_labels(labels.iter().map(|l| l.as_bytes())).unwrap_or_else(|_| Name::root())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::Domain;
    use crate::dns::pool::PoolConfig;
    use std::time::{Duration, UNIX_EPOCH};

    fn shim() -> Shim<impl Exists> {
        let names = Names::new(Domain::parse("home.example").unwrap());
        let pool = Pool::new(PoolConfig::default()).unwrap();
        let exists = |a: &Q2qAddress| match a.user.as_str() {
            "alice" | "bob" => Existence::Known,
            "maybe" => Existence::Unsure,
            _ => Existence::Unknown,
        };
        Shim::new(names, pool, exists, ShimConfig::default())
    }

    fn t() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    fn ask(s: &mut Shim<impl Exists>, name: &str, ty: RecordType) -> Message {
        let mut m = Message::query();
        m.metadata.recursion_desired = true;
        // Raw labels for names hickory's text parser refuses (the wire carries any bytes).
        let n = Name::from_ascii(name).unwrap_or_else(|_| {
            Name::from_labels(name.trim_end_matches('.').split('.').map(str::as_bytes)).unwrap()
        });
        m.add_query(Query::query(n, ty));
        let r = s.answer(&m.to_vec().unwrap(), t()).expect("an answer");
        let r = Message::from_vec(&r).unwrap();
        assert_eq!(r.metadata.id, m.metadata.id);
        assert_eq!(r.metadata.message_type, MessageType::Response);
        assert_eq!(r.queries, m.queries);
        r
    }

    #[test]
    fn forward_reverse_and_negative() {
        let mut s = shim();
        let r = ask(&mut s, "Alice.q2q.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].ttl, 5);
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(100, 64, 0, 2))));
        let r = ask(&mut s, "alice.home.example.q2q.", RecordType::AAAA);
        assert_eq!(r.answers[0].data, RData::AAAA(AAAA("fd71:7132::2".parse().unwrap())));

        let ptr = ask(&mut s, concat!("2.0", ".64.100.in-addr.arpa."), RecordType::PTR);
        assert_eq!(
            ptr.answers[0].data,
            RData::PTR(PTR(Name::from_ascii("alice.home.example.q2q.").unwrap()))
        );
        let v6 = reverse_name("fd71:7132::2".parse().unwrap());
        let ptr6 = ask(&mut s, &v6.to_ascii(), RecordType::PTR);
        assert_eq!(ptr6.answers.len(), 1);
        let unmapped = ask(&mut s, concat!("9.0", ".64.100.in-addr.arpa."), RecordType::PTR);
        assert_eq!(unmapped.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(unmapped.authorities[0].name.to_ascii(), "64.100.in-addr.arpa.");

        for (name, code) in [
            ("carol.q2q.", ResponseCode::NXDomain),
            ("-alice.q2q.", ResponseCode::NXDomain),
            ("a/b.q2q.", ResponseCode::NXDomain),
            ("alice.ex_ample.q2q.", ResponseCode::NXDomain),
            ("_ssh._tcp.alice.q2q.", ResponseCode::NXDomain),
            ("maybe.q2q.", ResponseCode::ServFail),
            ("example.com.", ResponseCode::Refused),
            ("alice.q2q.example.com.", ResponseCode::Refused),
            (concat!("8.8", ".8.8.in-addr.arpa."), ResponseCode::Refused),
            ("0.64.100.in-addr.arpa.", ResponseCode::Refused),
            (concat!("02.0", ".64.100.in-addr.arpa."), ResponseCode::Refused),
        ] {
            let r = ask(&mut s, name, RecordType::A);
            assert_eq!(r.metadata.response_code, code, "{name}");
            assert!(r.answers.is_empty(), "{name}");
            if code == ResponseCode::NXDomain {
                assert_eq!(r.authorities[0].record_type(), RecordType::SOA);
            }
        }
        // Known, other type: NODATA.
        let r = ask(&mut s, "bob.q2q.", RecordType::MX);
        assert_eq!(r.metadata.response_code, ResponseCode::NoError);
        assert!(r.answers.is_empty());
        assert!(s.pool().get(&Q2qAddress::parse("bob@home.example").unwrap()).is_none());
        // Apex SOA.
        let r = ask(&mut s, "q2q.", RecordType::SOA);
        assert_eq!(r.answers[0].record_type(), RecordType::SOA);
        // ANY gives both families.
        let r = ask(&mut s, "bob.q2q.", RecordType::ANY);
        assert_eq!(r.answers.len(), 2);
    }

    #[test]
    fn unsure_uses_existing_mapping() {
        let flip = std::rc::Rc::new(std::cell::Cell::new(Existence::Known));
        let names = Names::new(Domain::parse("home.example").unwrap());
        let pool = Pool::new(PoolConfig::default()).unwrap();
        let f = flip.clone();
        let mut s = Shim::new(names, pool, move |_: &Q2qAddress| f.get(), ShimConfig::default());
        let first = ask(&mut s, "dave.q2q.", RecordType::A);
        flip.set(Existence::Unsure);
        let again = ask(&mut s, "dave.q2q.", RecordType::A);
        assert_eq!(first.answers, again.answers);
        let r = ask(&mut s, "erin.q2q.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
        flip.set(Existence::Unknown);
        let r = ask(&mut s, "dave.q2q.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn unknown_to_the_cache_is_asked_in_two_steps() {
        let names = Names::new(Domain::parse("home.example").unwrap());
        let pool = Pool::new(PoolConfig::default()).unwrap();
        let exists = |a: &Q2qAddress| match a.user.as_str() {
            "alice" => Existence::Known,
            _ => Existence::Ask,
        };
        let mut s = Shim::new(names, pool, exists, ShimConfig::default());
        let query = |name: &str, ty| {
            let mut m = Message::query();
            m.add_query(Query::query(Name::from_ascii(name).unwrap(), ty));
            m
        };
        // Known, foreign and reverse names never wait.
        for (name, ty) in [("alice.q2q.", RecordType::A), ("example.com.", RecordType::A)] {
            let m = query(name, ty);
            assert!(matches!(s.start(&m.to_vec().unwrap(), t(), true), Step::Reply(Some(_))));
        }
        // Someone the cache does not know: a pending query, then the answer.
        let m = query("dave.far.example.q2q.", RecordType::AAAA);
        let Step::Ask(p) = s.start(&m.to_vec().unwrap(), t(), true) else { panic!("no ask") };
        assert_eq!(p.address(), &Q2qAddress::parse("dave@far.example").unwrap());
        let r = Message::from_vec(&s.finish(*p, Existence::Known, t()).unwrap()).unwrap();
        assert_eq!(r.metadata.id, m.metadata.id);
        assert_eq!(r.queries, m.queries);
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers[0].data, RData::AAAA(AAAA("fd71:7132::3".parse().unwrap())));
        // Unknown: NXDOMAIN; no answer in time: the mapping made a moment ago, else SERVFAIL.
        for (name, said, code) in [
            ("erin.q2q.", Existence::Unknown, ResponseCode::NXDomain),
            ("dave.far.example.q2q.", Existence::Unsure, ResponseCode::NoError),
            ("frank.q2q.", Existence::Unsure, ResponseCode::ServFail),
            ("frank.q2q.", Existence::Ask, ResponseCode::ServFail),
        ] {
            let m = query(name, RecordType::A);
            let Step::Ask(p) = s.start(&m.to_vec().unwrap(), t(), false) else { panic!("{name}") };
            let r = Message::from_vec(&s.finish(*p, said, t()).unwrap()).unwrap();
            assert_eq!(r.metadata.response_code, code, "{name} {said:?}");
        }
        // In one step, a question nobody asks counts as unsure.
        let r = ask(&mut s, "frank.q2q.", RecordType::A);
        assert_eq!(r.metadata.response_code, ResponseCode::ServFail);
    }

    #[test]
    fn hostile_packets() {
        let mut s = shim();
        assert_eq!(s.answer(b"", t()), None);
        assert_eq!(s.answer(&[0; 11], t()), None);
        // Garbage with a query header: FORMERR echoing the id.
        let r = s.answer(&[0xab, 0xcd, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xff], t()).unwrap();
        assert_eq!(r, [0xab, 0xcd, 0x81, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
        // A response is never answered.
        let mut m = Message::response(7, OpCode::Query);
        m.add_query(Query::query(Name::from_ascii("alice.q2q.").unwrap(), RecordType::A));
        assert_eq!(s.answer(&m.to_vec().unwrap(), t()), None);
        // Two questions: FORMERR; no questions: FORMERR; other opcodes: NOTIMP.
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii("alice.q2q.").unwrap(), RecordType::A));
        m.add_query(Query::query(Name::from_ascii("bob.q2q.").unwrap(), RecordType::A));
        let r = Message::from_vec(&s.answer(&m.to_vec().unwrap(), t()).unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        let m = Message::query();
        let r = Message::from_vec(&s.answer(&m.to_vec().unwrap(), t()).unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::FormErr);
        let mut m = Message::new(9, MessageType::Query, OpCode::Update);
        m.add_query(Query::query(Name::from_ascii("alice.q2q.").unwrap(), RecordType::A));
        let r = Message::from_vec(&s.answer(&m.to_vec().unwrap(), t()).unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NotImp);
        // CHAOS class: refused.
        let mut m = Message::query();
        let mut q = Query::query(Name::from_ascii("alice.q2q.").unwrap(), RecordType::TXT);
        q.set_query_class(DNSClass::CH);
        m.add_query(q);
        let r = Message::from_vec(&s.answer(&m.to_vec().unwrap(), t()).unwrap()).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::Refused);
    }

    #[test]
    fn edns_echoed() {
        let mut s = shim();
        let mut m = Message::query();
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
        m.add_query(Query::query(Name::from_ascii("alice.q2q.").unwrap(), RecordType::A));
        let r = Message::from_vec(&s.answer(&m.to_vec().unwrap(), t()).unwrap()).unwrap();
        assert_eq!(r.edns.map(|e| e.max_payload()), Some(EDNS_PAYLOAD));
    }

    #[test]
    fn reverse_names() {
        assert_eq!(
            reverse_name("100.64.0.2".parse().unwrap()).to_ascii(),
            concat!("2.0", ".64.100.in-addr.arpa.")
        );
        let n = reverse_name("fd71:7132::2".parse().unwrap()).to_ascii();
        assert!(
            n.starts_with(concat!("2.0", ".0.0."))
                && n.ends_with(concat!("2.3", ".1.7", ".1.7.d.f.ip6.arpa.")),
            "{n}"
        );
    }
}
