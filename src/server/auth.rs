//! Account and device names, and the server's brakes on authentication: a growing delay for an
//! address that keeps presenting bad tokens, and a token bucket on open registration. Both are
//! kept per source address (an IPv4 address, or an IPv6 /64: one host usually has a whole /64),
//! in bounded memory.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The longest account or device name, in characters.
pub const MAX_NAME: usize = 64;

/// What a name may hold, for error messages.
const NAME_RULE: &str = "1 to 64 letters, digits and `.` `_` `-` `@`, not starting with `-` or `.`";

fn name_char(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')
}

/// Checks an account or device name (`what` says which, for the message): 1 to [`MAX_NAME`]
/// characters, only Unicode letters and digits and `.` `_` `-` `@`, not starting with `-` (it
/// would read as an option) or `.`.
pub fn check_name(what: &str, s: &str) -> Result<(), String> {
    let n = s.chars().count();
    if n == 0 {
        return Err(format!("the {what} is empty; it must be {NAME_RULE}"));
    }
    if n > MAX_NAME {
        return Err(format!("the {what} {s:?} is {n} characters long; it must be {NAME_RULE}"));
    }
    if let Some(c) = s.chars().find(|&c| !name_char(c)) {
        return Err(format!("the {what} {s:?} holds {c:?}; it must be {NAME_RULE}"));
    }
    if s.starts_with(['-', '.']) {
        return Err(format!("the {what} {s:?} starts with `{}`; it must be {NAME_RULE}", &s[..1]));
    }
    Ok(())
}

/// A valid name made from any text (a client's device label, a host name): every character a
/// name may not hold becomes `-`, leading `-` and `.` go, and the rest is cut to [`MAX_NAME`]
/// characters; `device` if nothing is left.
pub fn sanitize_name(s: &str) -> String {
    let mapped: String = s.chars().map(|c| if name_char(c) { c } else { '-' }).collect();
    let name: String = mapped.trim_start_matches(['-', '.']).chars().take(MAX_NAME).collect();
    if name.is_empty() { "device".to_string() } else { name }
}

/// Failed authentications from one address that cost nothing: a client with a mistyped or
/// revoked token retries a few times before its user notices.
const FREE_FAILURES: u32 = 5;
/// The wait of the first attempt after the free failures; it doubles with each further one.
const FIRST_DELAY: Duration = Duration::from_millis(250);
/// The longest delay: tokens are 256 random bits, so the delay is not what stops guessing; it
/// keeps a misbehaving client from making the server hash and look up tokens in a tight loop,
/// while a user behind the same address as that client waits at most this long.
const MAX_DELAY: Duration = Duration::from_secs(5);
/// An address's failures are forgotten this long after its last one.
const FAILURE_MEMORY: Duration = Duration::from_secs(15 * 60);
/// Accounts one address may register at once under `--open-registration`: a user setting up a
/// few computers at once is not held up ...
const REGISTER_BURST: u32 = 3;
/// ... and after that one more per this long, so a script cannot fill the disk with accounts.
const REGISTER_EVERY: Duration = Duration::from_secs(20 * 60);
/// Addresses tracked per table (about 100 bytes each, so a few MiB at most): beyond this the
/// least recently active address is forgotten. An attacker with this many addresses gains nothing
/// from the delay being forgotten that its addresses did not give it already.
const MAX_TRACKED: usize = 65_536;

/// Failures and registrations are counted per source: an IPv4 address, or an IPv6 /64 (an
/// IPv4-mapped IPv6 address counts as its IPv4 address: a dual-stack listener sees IPv4 clients
/// so, and all of them would otherwise share one /64).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !(u64::MAX as u128))),
        },
    }
}

/// Per-source values, at most `cap` of them, in order of their last change (so the least
/// recently changed, which is also the first to expire, is found at once).
struct Table<V> {
    map: HashMap<IpAddr, (u64, Instant, V)>,
    /// Change number → source, oldest first.
    order: BTreeMap<u64, IpAddr>,
    next: u64,
    cap: usize,
}

impl<V> Table<V> {
    fn new(cap: usize) -> Self {
        Table { map: HashMap::new(), order: BTreeMap::new(), next: 0, cap }
    }

    /// The value of `key` if it changed less than `ttl` before `now`.
    fn get(&self, key: &IpAddr, now: Instant, ttl: Duration) -> Option<&V> {
        self.map.get(key).filter(|(_, at, _)| now.saturating_duration_since(*at) < ttl).map(|(_, _, v)| v)
    }

    /// Stores `key`'s new value as changed at `now`: values that changed `ttl` or longer ago are
    /// forgotten first, then the oldest while the table is full.
    fn put(&mut self, key: IpAddr, value: V, now: Instant, ttl: Duration) {
        if let Some((n, _, _)) = self.map.remove(&key) {
            self.order.remove(&n);
        }
        while let Some((&n, &oldest)) = self.order.first_key_value() {
            let expired =
                self.map.get(&oldest).is_none_or(|(_, at, _)| now.saturating_duration_since(*at) >= ttl);
            if !expired && self.map.len() < self.cap {
                break;
            }
            self.order.remove(&n);
            self.map.remove(&oldest);
        }
        let n = self.next;
        self.next += 1;
        self.order.insert(n, key);
        self.map.insert(key, (n, now, value));
    }

    fn remove(&mut self, key: &IpAddr) {
        if let Some((n, _, _)) = self.map.remove(key) {
            self.order.remove(&n);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

struct Inner {
    /// Recent failed authentications per source.
    failures: Table<u32>,
    /// Open registration's bucket per source, as the time it is full again (GCRA: each
    /// registration moves it [`REGISTER_EVERY`] later; one is allowed while it is at most
    /// `REGISTER_BURST - 1` intervals ahead).
    register: Table<Instant>,
}

/// The server's brakes on authentication and open registration, per source address (see the
/// module documentation). One for the whole server. The state is behind a `std::sync::Mutex`, not
/// Tokio's: each call holds it for a few map operations and never across an `.await`, where a
/// blocking mutex is cheaper and usable from blocking code too.
pub struct Limits {
    inner: Mutex<Inner>,
}

impl Default for Limits {
    fn default() -> Self {
        Self::new()
    }
}

impl Limits {
    pub fn new() -> Self {
        Self::with_capacity(MAX_TRACKED)
    }

    fn with_capacity(cap: usize) -> Self {
        Limits { inner: Mutex::new(Inner { failures: Table::new(cap), register: Table::new(cap) }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state is a cache of counts: whatever a panic left in it is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long to wait before answering an authentication attempt from `ip`: nothing up to
    /// [`FREE_FAILURES`] recent failures, then 250 ms doubling with each further one, at most 5 s.
    pub fn auth_delay(&self, ip: IpAddr) -> Duration {
        self.auth_delay_at(ip, Instant::now())
    }

    fn auth_delay_at(&self, ip: IpAddr, now: Instant) -> Duration {
        let n = self.lock().failures.get(&source(ip), now, FAILURE_MEMORY).copied().unwrap_or(0);
        delay_after(n)
    }

    /// Records a failed authentication from `ip`; returns its recent failures, this one included.
    pub fn auth_failed(&self, ip: IpAddr) -> u32 {
        self.auth_failed_at(ip, Instant::now())
    }

    fn auth_failed_at(&self, ip: IpAddr, now: Instant) -> u32 {
        let key = source(ip);
        let mut inner = self.lock();
        let n = inner.failures.get(&key, now, FAILURE_MEMORY).copied().unwrap_or(0).saturating_add(1);
        inner.failures.put(key, n, now, FAILURE_MEMORY);
        n
    }

    /// Records a successful authentication from `ip`: its failures are forgotten, so the other
    /// devices behind one address (a home router) are not held up by one with a revoked token
    /// once they get in. This lets a holder of a valid token reset its own address's count, which
    /// is harmless: the delay is a brake on load, not what stops guessing 256-bit tokens.
    pub fn auth_ok(&self, ip: IpAddr) {
        self.lock().failures.remove(&source(ip));
    }

    /// Whether `ip` may register an account now (taking one from its bucket: [`REGISTER_BURST`]
    /// at once, then one per [`REGISTER_EVERY`]); `Err` holds how long until it may.
    pub fn may_register(&self, ip: IpAddr) -> Result<(), Duration> {
        self.may_register_at(ip, Instant::now())
    }

    fn may_register_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let key = source(ip);
        // A bucket untouched for this long is full again: forgetting it changes nothing.
        let ttl = REGISTER_EVERY * REGISTER_BURST;
        let mut inner = self.lock();
        let full_at = inner.register.get(&key, now, ttl).copied().unwrap_or(now).max(now);
        let ahead = full_at - now;
        let room = REGISTER_EVERY * (REGISTER_BURST - 1);
        if ahead > room {
            return Err(ahead - room);
        }
        inner.register.put(key, full_at + REGISTER_EVERY, now, ttl);
        Ok(())
    }
}

/// The delay after `failures` recent failures.
fn delay_after(failures: u32) -> Duration {
    // After the 5th failure, the next attempt already waits.
    if failures < FREE_FAILURES {
        return Duration::ZERO;
    }
    // Capped shift: 250 ms << 5 is past the 5 s cap already.
    let doublings = (failures - FREE_FAILURES).min(16);
    (FIRST_DELAY * (1u32 << doublings)).min(MAX_DELAY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_allow_letters_digits_and_four_marks_only() {
        for ok in ["alice", "Zoë", "laptop-2", "a.b_c@d", "名前", "x", &"a".repeat(64), "9lives"] {
            assert_eq!(check_name("device name", ok), Ok(()), "{ok:?}");
        }
        for bad in ["", "-rf", ".hidden", "a b", "a/b", "a\\b", "tab\there", "a\u{202e}b", "a\u{200b}"] {
            assert!(check_name("device name", bad).is_err(), "{bad:?} was accepted");
        }
        assert!(check_name("account name", &"é".repeat(65)).is_err(), "65 characters");
        assert_eq!(check_name("account name", &"é".repeat(64)), Ok(()), "64 characters, 128 bytes");
        let e = check_name("account name", "bad\nname").unwrap_err();
        assert!(e.contains("account name") && e.contains(r#""bad\nname""#), "{e}");
        assert!(e.contains("letters, digits"), "does not say what is allowed: {e}");
        let e = check_name("device name", "-x").unwrap_err();
        assert!(e.contains("device name") && e.contains(r#""-x""#), "{e}");
    }

    #[test]
    fn sanitized_names_are_valid() {
        assert_eq!(sanitize_name("My Laptop (2)"), "My-Laptop--2-");
        assert_eq!(sanitize_name("host.example.org"), "host.example.org");
        assert_eq!(sanitize_name(""), "device");
        assert_eq!(sanitize_name("--- ..."), "device");
        assert_eq!(sanitize_name(".local"), "local");
        assert_eq!(sanitize_name("Zoë's Mac"), "Zoë-s-Mac");
        assert_eq!(sanitize_name(&"x".repeat(100)).len(), 64);
        assert_eq!(sanitize_name(&"é".repeat(100)).chars().count(), 64);
        for s in ["\n", "\u{0}", "a\u{202e}", "-", "..", "🙂🙂", &format!("-{}", "ü".repeat(80)), "ok"] {
            let n = sanitize_name(s);
            assert_eq!(check_name("device name", &n), Ok(()), "{s:?} -> {n:?}");
        }
    }

    #[test]
    fn after_five_failures_each_attempt_waits_doubling_and_capped() {
        let l = Limits::new();
        let t = Instant::now();
        let a = ip("192.0.2.1");
        let mut delays = Vec::new();
        for i in 1..=12 {
            assert_eq!(l.auth_failed_at(a, t), i);
            delays.push(l.auth_delay_at(a, t).as_millis());
        }
        assert_eq!(delays, [0, 0, 0, 0, 250, 500, 1000, 2000, 4000, 5000, 5000, 5000]);
        for _ in 0..100 {
            l.auth_failed_at(a, t);
        }
        assert_eq!(l.auth_delay_at(a, t), MAX_DELAY);
        // Other addresses are not affected.
        assert_eq!(l.auth_delay_at(ip("192.0.2.2"), t), Duration::ZERO);
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_while_or_a_success() {
        let l = Limits::new();
        let t = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..8 {
            l.auth_failed_at(a, t);
        }
        // Each failure restarts the memory.
        assert_eq!(l.auth_failed_at(a, t + FAILURE_MEMORY - Duration::from_secs(1)), 9);
        let later = t + 2 * FAILURE_MEMORY - Duration::from_secs(2);
        assert_eq!(l.auth_delay_at(a, later), Duration::from_secs(4));
        let quiet = t + 2 * FAILURE_MEMORY;
        assert_eq!(l.auth_delay_at(a, quiet), Duration::ZERO);
        assert_eq!(l.auth_failed_at(a, quiet), 1);
        for _ in 0..8 {
            l.auth_failed_at(a, quiet);
        }
        assert!(l.auth_delay_at(a, quiet) > Duration::ZERO);
        l.auth_ok(a);
        assert_eq!(l.auth_delay_at(a, quiet), Duration::ZERO);
        assert_eq!(l.auth_failed_at(a, quiet), 1);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let l = Limits::new();
        let t = Instant::now();
        for i in 0..5 {
            l.auth_failed_at(ip(&format!("2001:db8:1:2::{i:x}")), t);
        }
        assert_eq!(l.auth_delay_at(ip("2001:db8:1:2:ffff:ffff:ffff:ffff"), t), FIRST_DELAY);
        assert_eq!(l.auth_delay_at(ip("2001:db8:1:3::1"), t), Duration::ZERO, "another /64");
        for _ in 0..5 {
            l.auth_failed_at(ip("::ffff:198.51.100.7"), t);
        }
        assert_eq!(l.auth_delay_at(ip("198.51.100.7"), t), FIRST_DELAY);
        assert_eq!(l.auth_delay_at(ip("::ffff:198.51.100.8"), t), Duration::ZERO, "other IPv4 clients");
        assert_eq!(l.auth_delay_at(ip("::1"), t), Duration::ZERO);
    }

    #[test]
    fn memory_is_bounded_forgetting_the_oldest_and_the_expired() {
        let l = Limits::with_capacity(100);
        let t = Instant::now();
        let v4 = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        for i in 0..250 {
            for _ in 0..5 {
                l.auth_failed_at(v4(i), t + Duration::from_millis(i.into()));
            }
        }
        let at = t + Duration::from_secs(1);
        assert_eq!(l.lock().failures.len(), 100);
        assert_eq!(l.auth_delay_at(v4(0), at), Duration::ZERO, "the oldest was forgotten");
        assert_eq!(l.auth_delay_at(v4(149), at), Duration::ZERO);
        assert_eq!(l.auth_delay_at(v4(150), at), FIRST_DELAY, "the newest are kept");
        assert_eq!(l.auth_delay_at(v4(249), at), FIRST_DELAY);
        // Once expired, entries go as soon as anything is recorded.
        l.auth_failed_at(v4(1000), at + FAILURE_MEMORY);
        assert_eq!(l.lock().failures.len(), 1);
        for i in 0..250 {
            l.may_register_at(v4(i), t).unwrap();
        }
        assert_eq!(l.lock().register.len(), 100);
        // A bucket is forgotten once it is full again.
        l.may_register_at(v4(1000), t + REGISTER_EVERY * REGISTER_BURST).unwrap();
        assert_eq!(l.lock().register.len(), 1);
    }

    #[test]
    fn registration_allows_a_burst_of_three_then_one_per_twenty_minutes() {
        let l = Limits::new();
        let t = Instant::now();
        let a = ip("203.0.113.5");
        for _ in 0..3 {
            assert_eq!(l.may_register_at(a, t), Ok(()));
        }
        assert_eq!(l.may_register_at(a, t), Err(REGISTER_EVERY));
        let m = Duration::from_secs(60);
        assert_eq!(l.may_register_at(a, t + 5 * m), Err(15 * m), "a refusal takes nothing");
        assert_eq!(l.may_register_at(a, t + 20 * m), Ok(()));
        assert_eq!(l.may_register_at(a, t + 20 * m), Err(REGISTER_EVERY));
        // Another address has its own bucket; the same /64 shares one.
        assert_eq!(l.may_register_at(ip("203.0.113.6"), t), Ok(()));
        for _ in 0..3 {
            assert_eq!(l.may_register_at(ip("2001:db8::1"), t), Ok(()));
        }
        assert!(l.may_register_at(ip("2001:db8::2"), t).is_err());
        // A long quiet refills the whole burst, no more.
        let later = t + 10 * REGISTER_EVERY;
        for _ in 0..3 {
            assert_eq!(l.may_register_at(a, later), Ok(()));
        }
        assert_eq!(l.may_register_at(a, later), Err(REGISTER_EVERY));
    }
}
