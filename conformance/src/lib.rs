//! One conformance suite for the mesh (issue 12, item 4): each [`Scenario`] is written
//! once and run against two stacks, asserting the same outcomes within the tolerances
//! its documentation states.
//!
//! - [`Stack::InProcess`]: a `MeshClient` built by `mesh_test::MockMesh`, calling the
//!   mock endpoints directly over SPIFFE mTLS.
//! - [`Stack::Proxy`]: the `mesh-proxy` binary, meshing the same mock endpoints: the
//!   test's plain HTTP/1.1 client → an outbound proxy (plaintext listener) → mTLS → one
//!   inbound proxy per endpoint → the endpoint, served in plaintext
//!   (`MockServiceBuilder::plaintext`). The proxies' identities are PEM files written
//!   from the mesh's own CA, rewritten for rotations; each inbound proxy sits behind a
//!   TCP relay on the address the outbound proxy's static discovery names, so that an
//!   endpoint can be killed and restarted on its address and its connections dropped,
//!   as `MockEndpoint::kill` does in process.
//!
//! Both stacks are configured from the same text: a scenario's client policy is the body
//! of a `[services.NAME]` section (the proxy reads it from its file; in process it is
//! parsed into a `ServiceConfig` and handed to the `MeshClientBuilder`), and its server
//! policy is the body of an `[authorization.NAME]` or `[rate_limits.NAME]` section (an
//! inbound proxy's, or the mock service's own layers). The outcomes are read where both
//! stacks show them alike: what the callers got, and what each endpoint's application
//! received, from the mock mesh's event log. Where a stack has more to show (breaker
//! transitions from the in-process client's metrics, authorization events), a scenario
//! checks it on that stack alone.
//!
//! # Layout
//!
//! This library holds the scenarios and both runners; [`conformance_tests!`] expands to
//! one `#[test]` per scenario for a given stack. The in-process half is this crate's
//! `tests/in_process.rs`. The proxy half is `mesh-proxy/tests/conformance.rs`, because
//! Cargo gives `CARGO_BIN_EXE_mesh-proxy` (a binary built fresh for the test run) only to
//! the tests of the package that owns the binary: a dev-dependency on `mesh-proxy`
//! would not build it, and finding `target/debug/mesh-proxy` at run time could test a
//! stale binary. So `mesh-proxy` has this crate as a dev-dependency and passes the path
//! in with [`Stack::proxy`]. Both halves run in the workspace's test command, and the
//! list of scenarios exists once, in the macro.
//!
//! # Timing
//!
//! Every scenario runs on real loopback sockets with real TLS on a multi-threaded Tokio
//! runtime of two workers, and lasts one to five seconds. The tolerances are about
//! counts and shares, never about how fast anything is.

/// Fails the scenario with a message unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        let holds: bool = $cond;
        if !holds {
            return Err($crate::Failure::msg(format!($($fmt)+)));
        }
    };
}

mod harness;
mod proxy;
mod scenarios;

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// What a scenario runs against.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Stack {
    /// A `MeshClient` from `mesh_test::MockMesh`, straight to the mock endpoints over
    /// mTLS.
    InProcess,
    /// A `mesh-proxy` pair: outbound proxy → mTLS → an inbound proxy per endpoint → the
    /// endpoint in plaintext.
    Proxy {
        /// The `mesh-proxy` binary (in a test of `mesh-proxy`:
        /// `env!("CARGO_BIN_EXE_mesh-proxy")`).
        binary: PathBuf,
    },
}

impl Stack {
    /// The proxy stack, with the `mesh-proxy` binary at `binary`.
    pub fn proxy(binary: impl Into<PathBuf>) -> Self {
        Self::Proxy {
            binary: binary.into(),
        }
    }

    /// A short name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::InProcess => "in-process",
            Self::Proxy { .. } => "proxy",
        }
    }
}

/// Declares [`Scenario`] and its [`Scenario::ALL`] from one list, so that `ALL` cannot
/// miss a variant.
macro_rules! scenarios {
    ($($(#[$doc:meta])* $variant:ident,)*) => {
        /// The scenarios. Each variant's documentation states the setup, the expected
        /// outcome and its tolerance; every outcome is checked on both stacks unless it
        /// says otherwise.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum Scenario {
            $($(#[$doc])* $variant,)*
        }

        impl Scenario {
            /// Every scenario, in the order the suite runs them (declared with the enum,
            /// from the same list).
            pub const ALL: [Scenario; [$(Scenario::$variant),*].len()] =
                [$(Scenario::$variant),*];
        }
    };
}

scenarios! {
    /// Three endpoints answering after 5 ms, 5 ms and 300 ms; four callers for 2 s after a
    /// 0.5 s warm-up. **Expected:** no caller failure; the slow endpoint receives under
    /// 10 % of the requests and each fast one over 30 %.
    SlowEndpoint,
    /// Three endpoints, one answering every request 429 with `Retry-After: 5`; four
    /// callers for 1.5 s. **Expected:** no caller failure; a 429 is retried once on
    /// another endpoint, which answers (every request's tries are one success on a
    /// healthy endpoint, or a 429 then that: `requests + 429s` tries in all); the
    /// limited endpoint is tried at least once and then sidelined for its
    /// `Retry-After`: under 5 % of the requests reach it.
    RateLimitStorm,
    /// Three endpoints, one answering 503; ejection after 3 consecutive failures for 1 s
    /// (no jitter); two callers for 0.4 s, then the endpoint heals and two callers run for
    /// 1.5 s. **Expected:** no caller failure; the failing endpoint answers 3 to 5
    /// failures (3, plus what two callers had in flight) and nothing more while ejected;
    /// once healed it is back in rotation and answers successfully. In process, the
    /// client's breaker also reports exactly ejected → probation → reinstated.
    EjectionAndRecovery,
    /// Three endpoints answering after 5 ms; eight callers for 2 s; endpoint 1 is killed
    /// at 0.6 s (in process its listener and connections; through proxies, its inbound
    /// proxy with SIGKILL and its address) and restarted on the same address at 1.2 s.
    /// **Expected:** no idempotent request is lost (zero caller failures); the endpoint
    /// served requests before the kill; after the restart it receives requests again
    /// within 2 s of traffic. In process, the log also shows endpoint 1's kill, then its
    /// restart.
    EndpointKilled,
    /// Three endpoints all answering 503; retry budget 20 % plus 1 per second over 2 s;
    /// two callers for 1 s. **Expected:** every caller gets a 5xx answer (none succeeds,
    /// none hangs past 5 s); the endpoints receive at least one try per request and at
    /// most `1.2 × requests + 1 × (elapsed s + 2) + 4` tries in all (the budget's bound,
    /// plus what was in flight), far below the `3 ×` that two retries per request would
    /// give.
    TotalOutage,
    /// One endpoint whose policy denies by default and lets the caller's identity read
    /// `/public`. **Expected:** `GET /public/a` and `/public/b` answer 200, `GET /private`
    /// answers 403 and is not retried (one denial: in process in the mesh's log, through
    /// proxies in the inbound proxy's `mesh_server_authz_total`); the application
    /// receives exactly the two allowed requests. In process, the logged denial also
    /// names the caller.
    DenyByPolicy,
    /// One endpoint with a server-side limit of 10 requests per second (burst 5); one
    /// caller sending every 20 ms for 1 s. **Expected:** every answer is 200 or 429; each
    /// 429 carries `Retry-After`; at least 10 are 429; the endpoint's application answers
    /// exactly the 200s, at least 5 and at most `5 + 10 × elapsed s + 2`. (With a single
    /// endpoint there is nowhere to bias away to: the 429s reach the caller.)
    RateLimitedByServer,
    /// Three endpoints answering after 2 ms; eight callers throughout (about 2 s in
    /// process, 3.5 s through proxies), during which every workload gets a fresh SVID,
    /// then the trust anchors roll (new root trusted alongside the old, new SVIDs, old
    /// root dropped), each step followed by dropping one endpoint's connections so that
    /// new handshakes use the new credentials. Through proxies, the steps rewrite the
    /// proxies' PEM files and wait 0.4 s for their file watches at each. **Expected:** no
    /// caller failure; over 100 requests succeed; the last endpoint bounced serves
    /// requests after the old root is gone.
    CertificateRotation,
}

/// Why a scenario failed: what was expected, on which stack, and what was seen.
pub struct Failure(String);

impl Failure {
    pub(crate) fn msg(text: impl Into<String>) -> Self {
        Self(text.into())
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        Self(e.to_string())
    }
}

pub(crate) type Result<T, E = Failure> = std::result::Result<T, E>;

/// How long one scenario may take, set-up included, before it fails.
const SCENARIO_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `scenario` against `stack` on a new two-worker Tokio runtime.
pub fn run(stack: &Stack, scenario: Scenario) -> std::result::Result<(), Failure> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stack = stack.clone();
    runtime.block_on(async move {
        let name = stack.name();
        tracing::info!(stack = name, ?scenario, "conformance scenario");
        match tokio::time::timeout(SCENARIO_TIMEOUT, scenarios::run(&stack, scenario)).await {
            Ok(result) => result.map_err(|e| Failure(format!("{scenario:?} on {name}: {e}"))),
            Err(_) => Err(Failure(format!(
                "{scenario:?} on {name}: not done within {SCENARIO_TIMEOUT:?}"
            ))),
        }
    })
}

/// One `#[test]` per [`Scenario`] against the stack `$stack` (an expression of type
/// [`Stack`], evaluated in each test):
///
/// ```ignore
/// mesh_conformance::conformance_tests!(mesh_conformance::Stack::InProcess);
/// mesh_conformance::conformance_tests!(mesh_conformance::Stack::proxy(env!("CARGO_BIN_EXE_mesh-proxy")));
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($stack:expr) => {
        $crate::conformance_tests!(@each $stack;
            slow_endpoint_gets_a_small_share => SlowEndpoint,
            rate_limit_storm_sidelines_the_endpoint => RateLimitStorm,
            failing_endpoint_is_ejected_and_recovers => EjectionAndRecovery,
            killed_endpoint_loses_no_idempotent_request => EndpointKilled,
            total_outage_fails_fast_within_the_retry_budget => TotalOutage,
            deny_by_policy_answers_403 => DenyByPolicy,
            rate_limited_by_the_server_answers_429 => RateLimitedByServer,
            certificate_rotation_under_load_fails_nothing => CertificateRotation,
        );
    };
    (@each $stack:expr; $($name:ident => $scenario:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                if let Err(failure) = $crate::run(&$stack, $crate::Scenario::$scenario) {
                    panic!("{failure}");
                }
            }
        )*
        /// The list above names every scenario.
        #[test]
        fn every_scenario_has_a_test() {
            let listed = [$($crate::Scenario::$scenario),*];
            assert_eq!(listed, $crate::Scenario::ALL);
        }
    };
}
