use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::classify::{Code, StatusSet};

const EXAMPLE: &str = include_str!("../../../examples/config/mesh.toml");

/// `errors` are exactly `expected`, each matched by its start.
fn assert_exactly(errors: &[String], expected: &[&str]) {
    for want in expected {
        assert!(
            errors.iter().any(|e| e.starts_with(want)),
            "missing {want:?} in:\n{}",
            errors.join("\n")
        );
    }
    assert_eq!(errors.len(), expected.len(), "{}", errors.join("\n"));
}

fn invalid(text: &str) -> Vec<String> {
    match MeshConfig::from_toml(text) {
        Err(ConfigError::Invalid { errors, .. }) => {
            errors.iter().map(ToString::to_string).collect()
        }
        other => panic!("expected validation errors, got {other:?}"),
    }
}

fn parse_error(text: &str) -> String {
    match MeshConfig::from_toml(text) {
        Err(e @ ConfigError::Parse { .. }) => e.to_string(),
        other => panic!("expected a parse error, got {other:?}"),
    }
}

#[test]
fn example_config_is_valid_and_complete() {
    let c = MeshConfig::from_toml(EXAMPLE).unwrap();
    assert_eq!(c.zone.as_deref(), Some("eu-west-1a"));
    assert_eq!(c.tcp, TcpConfig::default());
    assert_eq!(c.services.len(), 4);
    assert_eq!(c.routes.len(), 3);
    assert_eq!(c.inbound[0].authorization.as_deref(), Some("api"));
    assert_eq!(c.authorization["api"].rules.len(), 3);
    let users = &c.services["users"];
    assert_eq!(users.timeout.per_try, Some(Duration::from_secs(1)));
    assert_eq!(
        users
            .circuit_breaker
            .success_rate
            .as_ref()
            .unwrap()
            .min_requests,
        20
    );
    let limit = &c.rate_limits["api"];
    assert_eq!(limit.per_client.as_ref().unwrap().burst(), 20);
    assert_eq!(limit.total.as_ref().unwrap().burst(), 1000);
    assert_eq!(
        c.inbound[0].limits.header_read_timeout,
        Some(Duration::from_secs(5))
    );
    assert_eq!(c.inbound[0].limits.max_request_body_size, Some(8 << 20));
    assert!(c.outbound[0].limits.is_default());
    assert!(c.outbound[1].transparent);
    assert_eq!(c.outbound[1].unmatched, Some(Unmatched::Passthrough));
    assert_eq!(users.addresses, ["10.96.0.20:80".parse().unwrap()]);
    assert!(matches!(
        &c.services["billing"].discovery,
        DiscoveryConfig::Static { endpoints } if endpoints[1].addr().is_ipv6()
    ));
}

#[test]
fn defaults_match_the_architecture() {
    let c = MeshConfig::from_toml(
        r#"
        [services.s]
        discovery = { kind = "dns", host = "s.internal", port = 80 }
        tls = "plaintext"
        "#,
    )
    .unwrap();
    let s = &c.services["s"];
    assert_eq!(s.protocol, Protocol::Auto);
    assert_eq!(s.connect_timeout, Duration::from_secs(1));
    assert_eq!(s.balancer.default_rtt, Duration::from_millis(30));
    assert_eq!(s.balancer.decay, Duration::from_secs(10));
    let r = &s.retry;
    assert!(r.enabled && !r.non_idempotent);
    assert_eq!((r.budget.ratio, r.budget.min_per_second), (0.2, 10));
    assert_eq!(r.budget.ttl, Duration::from_secs(10));
    assert_eq!(r.max_replay_body, 64 * 1024);
    assert_eq!(r.statuses, StatusSet::SERVER_ERRORS);
    assert!(r.grpc_codes.contains(Code::Unavailable));
    assert_eq!(
        (r.backoff.min, r.backoff.max),
        (Duration::from_millis(25), Duration::from_millis(250))
    );
    let b = &s.circuit_breaker;
    assert_eq!(b.consecutive_failures, 7);
    assert_eq!(
        (b.backoff.min, b.backoff.max),
        (Duration::from_secs(1), Duration::from_secs(60))
    );
    assert!(b.success_rate.is_none());
    assert_eq!(s.rate_limited.default_penalty, Duration::from_secs(1));
    assert!(!s.rate_limited.count_toward_ejection);
    assert_eq!(
        crate::classify::Classifier::from(&s.classification),
        Default::default()
    );
    assert_eq!(s.timeout, TimeoutConfig::default());
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    if let DiscoveryConfig::Dns {
        min_ttl, max_ttl, ..
    } = &s.discovery
    {
        assert_eq!(
            (*min_ttl, *max_ttl),
            (Duration::from_secs(5), Duration::from_secs(300))
        );
    }
}

#[test]
fn every_validation_error_is_reported_with_its_path() {
    let errors = invalid(
        r#"
        [services.users]
        discovery = { kind = "dns", host = "-bad-", port = 0, min_ttl = "10m" }
        [services.users.retry]
        budget = { ratio = 1.5, ttl = "0s" }
        backoff = { min = "1s", max = "10ms", jitter = 2 }
        [services.users.timeout]
        request = "1s"
        per_try = "2s"
        [services.users.circuit_breaker]
        consecutive_failures = 0
        max_ejected_share = -0.1

        [[routes]]
        name = "r"
        backends = [{ service = "users" }, { service = "users-canary" }]
        matches = [{ path = { regex = "(" } }, { path = { prefix = "api" } }]

        [[inbound]]
        name = "in"
        listen = "127.0.0.1:4143"
        target = "127.0.0.1:4143"
        authorization = "missing"
        "#,
    );
    let expected = [
        "services.users.discovery.host: `-bad-` is not a valid DNS name",
        "services.users.discovery.port: must not be 0",
        "services.users.discovery.min_ttl: must not exceed max_ttl (10m > 5m)",
        "services.users.tls: mtls needs an [identity] section",
        "services.users.server_identity: required with tls = \"mtls\"",
        "services.users.retry.budget.ratio: must be between 0 and 1 (got 1.5)",
        "services.users.retry.budget.ttl: must be between 1s and 60s (got 0s)",
        "services.users.retry.backoff.min: must not exceed max (1s > 10ms)",
        "services.users.retry.backoff.jitter: must be between 0 and 1 (got 2)",
        "services.users.timeout.per_try: must not exceed request (2s > 1s)",
        "services.users.circuit_breaker.consecutive_failures: must be at least 1",
        "services.users.circuit_breaker.max_ejected_share: must be between 0 and 1 (got -0.1)",
        "routes[0].matches[0].path.regex: invalid regex `(`",
        "routes[0].matches[1].path: `api` must start with `/`",
        "routes[0].backends[1].service: no service named `users-canary`",
        "inbound[0].target: 127.0.0.1:4143 reaches this proxy's own listener 127.0.0.1:4143 (inbound[0].listen)",
        "inbound[0].tls: mtls needs an [identity] section",
        "inbound[0].authorization: no authorization policy named `missing`",
    ];
    assert_exactly(&errors, &expected);
}

#[test]
fn references_names_and_listeners() {
    let errors = invalid(
        r#"
        [identity]
        source = "files"
        cert = "c.pem"
        key = "k.pem"
        bundles = {}
        [admin]
        listen = "127.0.0.1:9000"
        [[outbound]]
        name = "x"
        listen = "127.0.0.1:9000"
        protocol = "opaque"
        [[inbound]]
        name = "x"
        listen = "127.0.0.1:9001"
        target = "127.0.0.1:8080"
        tls = "plaintext"
        rate_limit = "nope"
        [authorization.p]
        rules = [{ name = "a" }, { name = "a", clients = ["*"], routes = [{ headers = [{ name = "bad header", regex = "[" }] }] }]
        [rate_limits.empty]
        [rate_limits."bad name!"]
        total = { requests = 0, per = "0s", burst = 0 }
        "#,
    );
    let expected = [
        "identity.bundles: needs at least one",
        "outbound[0].listen: 127.0.0.1:9000 is already used by admin.listen",
        "outbound[0].default_service: required with protocol = \"opaque\"",
        "inbound[0].rate_limit: no rate limit named `nope`",
        "outbound[0].name: duplicate listener name `x`",
        "authorization.p.rules[0].clients: admits no client",
        "authorization.p.rules[1].name: duplicate rule name `a`",
        "authorization.p.rules[1].routes[0].headers[0].name: `bad header` is not a valid header name",
        "authorization.p.rules[1].routes[0].headers[0].regex: invalid regex `[`",
        "rate_limits.empty: limits nothing",
        "rate_limits.\"bad name!\": `bad name!` is not a valid name",
        "rate_limits.\"bad name!\".total.requests: must be at least 1",
        "rate_limits.\"bad name!\".total.per: must be greater than zero",
        "rate_limits.\"bad name!\".total.burst: must be at least 1",
    ];
    assert_exactly(&errors, &expected);
}

#[test]
fn parse_errors_name_the_key_and_line() {
    let e = parse_error(
        "[services.users]\ndiscovery = { kind = \"dns\", host = \"a\", port = 1 }\ntimeuot = {}\n",
    );
    assert!(e.contains("at `services.users.timeuot`"), "{e}");
    assert!(e.contains("unknown field `timeuot`"), "{e}");
    assert!(e.contains("line 3"), "{e}");

    let e = parse_error(
        "[services.users]\ndiscovery = { kind = \"dns\", host = \"a\", port = 1 }\nconnect_timeout = \"soon\"\n",
    );
    assert!(e.contains("at `services.users.connect_timeout`"), "{e}");
    assert!(e.contains("invalid duration `soon`"), "{e}");

    let e = parse_error(
        "[[inbound]]\nname = \"a\"\nlisten = \"localhost:80\"\ntarget = \"127.0.0.1:1\"\n",
    );
    assert!(e.contains("inbound[0].listen"), "{e}");

    // Two bundle keys naming one trust domain would merge, one file silently left out.
    let bundles = |keys: &str| {
        format!(
            "[identity]\nsource = \"files\"\ncert = \"c\"\nkey = \"k\"\n[identity.bundles]\n{keys}"
        )
    };
    for key in [
        "Example.org",
        "spiffe://example.org",
        "SPIFFE://example.org",
    ] {
        let e = parse_error(&bundles(&format!(
            "\"example.org\" = \"a.pem\"\n\"{key}\" = \"b.pem\"\n"
        )));
        assert!(e.contains("as another key does"), "{key}: {e}");
        // Alone, any spelling of the trust domain is taken.
        let c = MeshConfig::from_toml(&bundles(&format!("\"{key}\" = \"b.pem\"\n")));
        assert!(c.is_ok(), "{key}: {c:?}");
    }
    // A workload's ID where the trust domain was meant is refused.
    let e = parse_error(&bundles("\"spiffe://example.org/ns/x\" = \"a.pem\"\n"));
    assert!(e.contains("has a path"), "{e}");

    let e =
        parse_error("[authorization.p]\nrules = [{ name = \"r\", clients = [\"spiffe://td\"] }]\n");
    assert!(e.contains("authorization.p.rules[0].clients[0]"), "{e}");
    assert!(e.contains("write `spiffe://td/*`"), "{e}");

    let e = parse_error(
        "[services.db]\ndiscovery = { kind = \"dns\", host = \"a\", port = 1 }\naddresses = [\"10.1.2.7/24:5432\"]\n",
    );
    assert!(e.contains("services.db.addresses[0]"), "{e}");
    assert!(
        e.contains("host bits set (the network is 10.1.2.0/24)"),
        "{e}"
    );

    let e = parse_error("[services.s]\ndiscovery = { kind = \"consul\" }\n");
    assert!(e.contains("unknown variant `consul`"), "{e}");

    let e = parse_error("zone = \n");
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.toml");
    let e = MeshConfig::from_file(&path).unwrap_err().to_string();
    assert!(
        e.starts_with("reading config file") && e.contains("mesh.toml"),
        "{e}"
    );
    std::fs::write(&path, "[[routes]]\nname = \"r\"\nbackends = []\n").unwrap();
    let e = MeshConfig::from_file(&path).unwrap_err();
    assert_eq!(e.validation_errors().len(), 1);
    let text = e.to_string();
    assert!(
        text.contains(
            "mesh.toml: 1 error in configuration:\n  routes[0].backends: needs at least one backend"
        ),
        "{text}"
    );
}

#[test]
fn transparent_listeners_and_service_addresses() {
    let errors = invalid(
        r#"
        [[outbound]]
        name = "t"
        listen = "127.0.0.1:4140"
        transparent = true
        default_service = "a"
        protocol = "opaque"
        [[outbound]]
        name = "explicit"
        listen = "127.0.0.1:4141"
        unmatched = "refuse"
        limits = { header_read_timeout = "0s", max_connections = 0, max_headers = 10, max_cancelled_requests = 0, premature_cancel_window = "0s" }
        [[outbound]]
        name = "edge"
        listen = "127.0.0.1:4142"
        protocol = "opaque"
        default_service = "a"
        certificate = { cert = "", key = "edge.key" }
        [services.a]
        discovery = { kind = "static", endpoints = [{ addr = "10.0.0.1:4143" }] }
        tls = "plaintext"
        addresses = ["10.96.0.1:80", "0.0.0.0:80", "10.96.0.2:0", "127.0.0.1:4140", "10.1.0.0/16:5432", "127.0.0.0/8:4141", "10.2.0.0/16:0"]
        [services.b]
        discovery = { kind = "static", endpoints = [{ addr = "10.0.0.2:4143" }] }
        tls = "plaintext"
        addresses = ["10.96.0.1:80", "10.1.0.0/16:5432", "10.1.2.0/24:5432", "[2001:db8::/32]:443"]
        "#,
    );
    assert_exactly(
        &errors,
        &[
            "outbound[0].default_service: not used by a transparent listener",
            "outbound[0].protocol: a transparent listener detects",
            "outbound[1].unmatched: only for a transparent listener",
            "outbound[1].limits.header_read_timeout: must be greater than zero",
            "outbound[1].limits.max_connections: must be at least 1",
            "outbound[1].limits.max_cancelled_requests: must be at least 1",
            "outbound[2].certificate.cert: must not be empty",
            "outbound[2].certificate: TLS is terminated on HTTP listeners only",
            "services.a.addresses[1]: 0.0.0.0:80 is not a destination",
            "services.a.addresses[2]: 10.96.0.2:0 is not a destination",
            "services.a.addresses[3]: 127.0.0.1:4140 is one of this proxy's listeners",
            "services.a.addresses[5]: 127.0.0.0/8:4141 holds this proxy's listener 127.0.0.1:4141 (it would loop)",
            "services.a.addresses[6]: 10.2.0.0/16:0 is not a destination",
            "services.b.addresses[0]: 10.96.0.1:80 is already the address of service `a`",
            "services.b.addresses[1]: 10.1.0.0/16:5432 is already the address of service `a`",
        ],
    );
}

#[test]
fn access_logs_are_for_http_listeners() {
    let errors = invalid(
        r#"
        [[inbound]]
        name = "db"
        listen = "0.0.0.0:4143"
        target = "127.0.0.1:5432"
        tls = "plaintext"
        protocol = "opaque"
        access_log = true
        [[outbound]]
        name = "db-out"
        listen = "127.0.0.1:4140"
        protocol = "opaque"
        default_service = "a"
        access_log = true
        [services.a]
        discovery = { kind = "static", endpoints = [{ addr = "10.0.0.1:4143" }] }
        tls = "plaintext"
        "#,
    );
    assert_exactly(
        &errors,
        &[
            "inbound[0].access_log: opaque listeners relay bytes, not requests",
            "outbound[0].access_log: opaque listeners relay bytes, not requests",
        ],
    );
    let c = MeshConfig::from_toml(EXAMPLE).unwrap();
    assert!(c.inbound[0].access_log);
    assert!(!c.outbound[0].access_log);
}

#[test]
fn opaque_listeners_take_only_the_limits_of_relays() {
    let errors = invalid(
        r#"
        [[inbound]]
        name = "db"
        listen = "0.0.0.0:4143"
        target = "127.0.0.1:5432"
        tls = "plaintext"
        protocol = "opaque"
        limits = { max_connections = 100, tunnel_idle_timeout = "10m", idle_timeout = "30s", max_headers = 10, premature_cancel_window = "2s" }
        [[outbound]]
        name = "db-out"
        listen = "127.0.0.1:4140"
        protocol = "opaque"
        default_service = "a"
        limits = { tunnel_idle_timeout = "0s", header_read_timeout = "1s" }
        [[outbound]]
        name = "web"
        listen = "127.0.0.1:4141"
        default_service = "a"
        limits = { tunnel_idle_timeout = "90s", idle_timeout = "30s" }
        [services.a]
        discovery = { kind = "static", endpoints = [{ addr = "10.0.0.1:4143" }] }
        tls = "plaintext"
        "#,
    );
    assert_exactly(
        &errors,
        &[
            "inbound[0].limits.max_headers: an HTTP limit, and opaque listeners relay bytes",
            "inbound[0].limits.idle_timeout: an HTTP limit, and opaque listeners relay bytes",
            "inbound[0].limits.premature_cancel_window: an HTTP limit, and opaque listeners relay bytes",
            "outbound[0].limits.header_read_timeout: an HTTP limit, and opaque listeners relay bytes",
        ],
    );
    // Without the HTTP limits it is valid, and `0s` (off) is allowed.
    let c = MeshConfig::from_toml(
        r#"
        [[inbound]]
        name = "db"
        listen = "0.0.0.0:4143"
        target = "127.0.0.1:5432"
        tls = "plaintext"
        protocol = "opaque"
        limits = { max_connections = 100, tunnel_idle_timeout = "10m" }
        [[outbound]]
        name = "db-out"
        listen = "127.0.0.1:4140"
        protocol = "opaque"
        default_service = "a"
        limits = { tunnel_idle_timeout = "0s" }
        [services.a]
        discovery = { kind = "static", endpoints = [{ addr = "10.0.0.1:4143" }] }
        tls = "plaintext"
        "#,
    )
    .unwrap();
    assert_eq!(
        c.inbound[0].limits.tunnel_idle_timeout,
        Some(std::time::Duration::from_secs(600))
    );
    assert_eq!(
        c.outbound[0].limits.tunnel_idle_timeout,
        Some(std::time::Duration::ZERO)
    );
}

#[test]
fn serializes_back_to_an_equal_config() {
    let c = MeshConfig::from_toml(EXAMPLE).unwrap();
    let text = toml::to_string(&c).unwrap();
    let back = MeshConfig::from_toml(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(back, c);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        let _ = MeshConfig::from_toml(&text);
    }

    #[test]
    fn never_panics_on_mutated_example(pos in 0usize..EXAMPLE.len(), len in 0usize..40, junk in "[\\[\\]{}=\",.a-z0-9 \n-]{0,12}") {
        let mut text = EXAMPLE.as_bytes().to_vec();
        let end = (pos + len).min(text.len());
        text.splice(pos..end, junk.bytes());
        if let Ok(text) = String::from_utf8(text)
            && let Err(e) = MeshConfig::from_toml(&text)
        {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

#[test]
fn query_matches_parse_and_are_validated() {
    let config = MeshConfig::from_toml(
        r#"
        [authorization.p]
        rules = [{ name = "a", clients = ["*"], routes = [{ query = [{ name = "v", exact = "2" }, { name = "id", regex = "[0-9]+" }] }] }]
        "#,
    )
    .unwrap();
    let query = &config.authorization["p"].rules[0].routes[0].query;
    assert_eq!(query[0].name, "v");
    assert_eq!(query[0].value, QueryValueMatch::Exact("2".into()));
    assert_eq!(query[1].value, QueryValueMatch::Regex("[0-9]+".into()));
    let errors = invalid(
        r#"
        [authorization.p]
        rules = [{ name = "a", clients = ["*"], routes = [{ query = [{ name = "", exact = "x" }, { name = "a=b", regex = "(" }] }] }]
        "#,
    );
    let expected = [
        "authorization.p.rules[0].routes[0].query[0].name: `` is not a query parameter name",
        "authorization.p.rules[0].routes[0].query[1].name: `a=b` is not a query parameter name",
        "authorization.p.rules[0].routes[0].query[1].regex: invalid regex `(`",
    ];
    assert_exactly(&errors, &expected);
}

/// The graces before a withdrawn identity or an unknown DNS name is given up take their
/// keys, and default to 30 s.
#[test]
fn withdrawal_and_nxdomain_graces_have_keys() {
    let config = MeshConfig::from_toml(
        r#"
        [identity]
        source = "spire"
        withdrawal_grace = "2m"
        [services.web]
        tls = "plaintext"
        discovery = { kind = "dns", host = "web.internal", port = 8080, nxdomain_grace = "5s" }
        [services.api]
        tls = "plaintext"
        discovery = { kind = "dns-srv", name = "_http._tcp.api.internal" }
        "#,
    )
    .unwrap();
    let Some(IdentityConfig::Spire {
        withdrawal_grace, ..
    }) = &config.identity
    else {
        panic!("not spire");
    };
    assert_eq!(*withdrawal_grace, Duration::from_secs(120));
    let DiscoveryConfig::Dns { nxdomain_grace, .. } = &config.services["web"].discovery else {
        panic!("not dns");
    };
    assert_eq!(*nxdomain_grace, Duration::from_secs(5));
    let DiscoveryConfig::DnsSrv { nxdomain_grace, .. } = &config.services["api"].discovery else {
        panic!("not dns-srv");
    };
    assert_eq!(*nxdomain_grace, Duration::from_secs(30));
    let spire = MeshConfig::from_toml("[identity]\nsource = \"spire\"\n").unwrap();
    assert!(matches!(
        spire.identity,
        Some(IdentityConfig::Spire { withdrawal_grace, .. }) if withdrawal_grace == Duration::from_secs(30)
    ));
}

#[test]
fn dns_discovery_takes_its_name_servers_and_no_address_for_a_name() {
    let config = MeshConfig::from_toml(
        r#"
        [services.web]
        tls = "plaintext"
        discovery = { kind = "dns", host = "web.service.consul", port = 8080, name_servers = ["127.0.0.1:8600", "[::1]:53"] }
        "#,
    )
    .unwrap();
    let DiscoveryConfig::Dns { name_servers, .. } = &config.services["web"].discovery else {
        panic!("not dns");
    };
    assert_eq!(
        name_servers,
        &[
            "127.0.0.1:8600".parse().unwrap(),
            "[::1]:53".parse().unwrap()
        ]
    );
    let errors = invalid(
        r#"
        [services.web]
        tls = "plaintext"
        discovery = { kind = "dns", host = "10.0.0.1", port = 80, name_servers = ["127.0.0.1:0", "0.0.0.0:53"] }
        [services.srv]
        tls = "plaintext"
        discovery = { kind = "dns-srv", name = "_http._tcp.example.org", name_servers = ["[::]:53", "[fe80::1%2]:53"] }
        "#,
    );
    let expected = [
        "services.srv.discovery.name_servers[0]: `[::]:53` is not a name server's address (an IP and a port)",
        "services.srv.discovery.name_servers[1]: `[fe80::1%2]:53` is link-local, which the DNS client cannot reach",
        "services.web.discovery.host: `10.0.0.1` is an address, not a DNS name: list it with kind = \"static\"",
        "services.web.discovery.name_servers[0]: `127.0.0.1:0` is not a name server's address (an IP and a port)",
        "services.web.discovery.name_servers[1]: `0.0.0.0:53` is not a name server's address (an IP and a port)",
    ];
    assert_exactly(&errors, &expected);
}

#[test]
fn conditions_that_could_never_match_are_refused() {
    let errors = invalid(
        r#"
        [authorization.p]
        rules = [{ name = "a", clients = ["*"], routes = [
            { path = { exact = "/a/../b" } },
            { path = { prefix = "//" } },
            { path = { prefix = "/p/%2Fq" } },
            { path = { exact = "/a?x=1" } },
            { path = { prefix = "/a/." } },
            { path = { regex = "(?x)/users/[0-9]+ # an id" } },
            { path = { regex = "/a)|(/b" } },
            { path = { prefix = "/api/" }, headers = [{ name = "x-env", exact = "a" }, { name = "X-Env", exact = "b" }] },
            { query = [{ name = "v", exact = "1" }, { name = "v", exact = "2" }, { name = "a;b", exact = "3" }] },
            { headers = [{ name = "x-env", exact = "a" }, { name = "x_env", exact = "b" }] },
        ] }]
        "#,
    );
    let r = "authorization.p.rules[0].routes";
    let never = "can never match: a path with a `.`, `..` or empty segment, a `\\`, or an encoded `/`, `\\` or `.` matches no path condition";
    let expected = [
        format!("{r}[0].path: `/a/../b` {never}"),
        format!("{r}[1].path: `//` {never}"),
        format!("{r}[2].path: `/p/%2Fq` {never}"),
        format!(
            "{r}[3].path: `/a?x=1` can never match: `?` and `#` end a path (match the query with `query`)"
        ),
        format!("{r}[4].path: `/a/.` {never}"),
        format!("{r}[6].path.regex: invalid regex `/a)|(/b`"),
        format!(
            "{r}[7].headers[1].name: header `X-Env` is matched twice in this match: give one condition per header"
        ),
        format!(
            "{r}[8].query[1].name: parameter `v` is matched twice in this match: give one condition per parameter"
        ),
        format!("{r}[8].query[2].name: `a;b` is not a query parameter name"),
        format!(
            "{r}[9].headers[1].name: header `x_env` is matched twice in this match: give one condition per header"
        ),
    ];
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    assert_exactly(&errors, &expected);
}

#[test]
fn fault_aborts_need_a_final_status_and_ratios_in_range() {
    let errors = invalid(
        r#"
        [services.users]
        discovery = { kind = "static", endpoints = [{ addr = "127.0.0.1:8080" }] }
        tls = "plaintext"
        [[routes]]
        name = "r"
        backends = [{ service = "users" }]
        fault = { abort_status = 103, abort_ratio = 1.5 }
        "#,
    );
    assert_exactly(
        &errors,
        &[
            "routes[0].fault.abort_ratio:",
            "routes[0].fault.abort_status: must be a final HTTP status from 200 to 599 (got 103)",
        ],
    );
}

#[test]
fn the_admin_decision_record_is_bounded() {
    let errors = invalid(
        r#"
        [admin]
        listen = "127.0.0.1:9000"
        decisions = 1000000
        "#,
    );
    assert_eq!(
        errors,
        ["admin.decisions: at most 100000 (0 keeps no record)"]
    );
    let ok = MeshConfig::from_toml(
        r#"
        [admin]
        listen = "127.0.0.1:9000"
        decisions = 1024
        "#,
    )
    .unwrap();
    assert_eq!(ok.admin.map(|a| a.decisions), Some(1024));
}

#[test]
fn tcp_options_parse_and_stay_in_the_kernels_ranges() {
    let defaults = MeshConfig::from_toml("").unwrap().tcp;
    assert_eq!(defaults, TcpConfig::default());
    assert_eq!(defaults.keepalive_idle, Duration::from_secs(10));
    assert_eq!(defaults.keepalive_interval, Duration::from_secs(10));
    assert_eq!(defaults.keepalive_probes, 3);
    assert_eq!(defaults.user_timeout, Duration::from_secs(40));
    let c = MeshConfig::from_toml(
        r#"
        [tcp]
        keepalive_idle = "2m"
        keepalive_probes = 5
        user_timeout = "0s"
        "#,
    )
    .unwrap();
    assert_eq!(c.tcp.keepalive_idle, Duration::from_secs(120));
    assert_eq!(c.tcp.keepalive_interval, Duration::from_secs(10));
    assert_eq!(c.tcp.keepalive_probes, 5);
    assert!(c.tcp.user_timeout.is_zero());
    assert!(c.tcp.keepalive());
    // Keepalive off: its other options are not looked at.
    let off = MeshConfig::from_toml(
        r#"
        [tcp]
        keepalive_idle = "0s"
        keepalive_interval = "0s"
        keepalive_probes = 0
        "#,
    )
    .unwrap();
    assert!(!off.tcp.keepalive());
    assert_exactly(
        &invalid(
            r#"
            [tcp]
            keepalive_idle = "1500ms"
            keepalive_interval = "10h"
            keepalive_probes = 128
            user_timeout = "25d"
            "#,
        ),
        &[
            "tcp.keepalive_idle: must be whole seconds from 1s to 32767s",
            "tcp.keepalive_interval: must be whole seconds from 1s to 32767s",
            "tcp.keepalive_probes: must be from 1 to 127",
            "tcp.user_timeout: must be whole milliseconds up to 2147483647ms",
        ],
    );
    assert_exactly(
        &invalid("[tcp]\nkeepalive_interval = \"0s\"\nkeepalive_probes = 0\n"),
        &["tcp.keepalive_interval: ", "tcp.keepalive_probes: "],
    );
    assert_exactly(
        &invalid("[tcp]\nuser_timeout = \"1500us\"\n"),
        &["tcp.user_timeout: "],
    );
    assert!(parse_error("[tcp]\nkeepalive = true\n").contains("tcp"));
    // Written back only when set.
    let text = toml::to_string(&MeshConfig::default()).unwrap();
    assert!(!text.contains("[tcp]"), "{text}");
    let text = toml::to_string(&c).unwrap();
    assert_eq!(MeshConfig::from_toml(&text).unwrap().tcp, c.tcp);
}

#[test]
fn sizes_and_durations_far_past_any_use_are_refused() {
    let e = parse_error("drain_timeout = \"300000000000years\"\n");
    assert!(e.contains("at `drain_timeout`"), "{e}");
    assert!(e.contains("too long: at most 10 years"), "{e}");
    let e = parse_error(
        "[[outbound]]\nname = \"o\"\nlisten = \"127.0.0.1:1\"\nlimits = { idle_timeout = \"11y\" }\n",
    );
    assert!(e.contains("too long"), "{e}");
    assert!(MeshConfig::from_toml("drain_timeout = \"9y\"\n").is_ok());
    // Ten years, as the message says (humantime's years are 365.25 days).
    assert!(MeshConfig::from_toml("drain_timeout = \"10y\"\n").is_ok());
    assert_exactly(
        &invalid(
            "[[outbound]]\nname = \"o\"\nlisten = \"127.0.0.1:1\"\n\
             limits = { max_headers = 100000, max_connections = 4611686018427387904, \
             max_cancelled_requests = 18446744073709551615, max_header_list_size = 4294967295 }\n\
             [rate_limits.slow]\n\
             per_client = { requests = 1, per = \"1d\", burst = 1000000 }\n\
             total = { requests = 1, per = \"3650days\", burst = 60 }\n\
             overrides = [{ clients = [\"spiffe://a/b\"], limit = { requests = 10, per = \"1d\", burst = 40000 } }]\n",
        ),
        &[
            "outbound[0].limits.max_header_list_size: at most 1048576",
            "rate_limits.slow.total.burst: a burst of 60 at 1 per ",
            "rate_limits.slow.per_client.burst: a burst of 1000000 at 1 per 1day takes over 10 years",
            "rate_limits.slow.overrides[0].limit.burst: a burst of 40000 at 10 per 1day takes over 10 years",
            "outbound[0].limits.max_headers: at most 32767",
            "outbound[0].limits.max_connections: at most 10000000",
            "outbound[0].limits.max_cancelled_requests: at most 10000000",
        ],
    );
}

#[test]
fn pools_parse_default_and_are_bounded() {
    let base = r#"
        [services.web]
        tls = "plaintext"
        discovery = { kind = "static", endpoints = [{ addr = "127.0.0.1:8080" }] }
    "#;
    let c = MeshConfig::from_toml(base).unwrap();
    let pool = c.services["web"].pool;
    assert!(pool.is_default());
    assert_eq!(pool.max_connections, 1024);
    assert_eq!(pool.max_pending, 1024);
    assert_eq!(pool.idle_timeout, Duration::from_secs(90));
    assert_eq!(pool.body_read_timeout, Duration::from_secs(60));
    let c = MeshConfig::from_toml(&format!(
        r#"{base}
        [services.web.pool]
        max_connections = 8
        max_pending = 0
        body_read_timeout = "0s"

        [[inbound]]
        name = "app"
        listen = "127.0.0.1:4143"
        target = "127.0.0.1:8080"
        tls = "plaintext"
        pool = {{ idle_timeout = "5s", body_read_timeout = "5m" }}
        "#
    ))
    .unwrap();
    let pool = c.services["web"].pool;
    assert_eq!((pool.max_connections, pool.max_pending), (8, 0));
    assert!(pool.body_read_timeout.is_zero());
    let app = c.inbound[0].pool;
    assert_eq!(app.idle_timeout, Duration::from_secs(5));
    assert_eq!(app.body_read_timeout, Duration::from_secs(300));
    assert_eq!(app.max_connections, 1024);
    // The effective config shows a pool only where one is set.
    let shown = toml::to_string(&c).unwrap();
    assert_eq!(shown.matches("pool").count(), 2, "{shown}");
    assert_exactly(
        &invalid(&format!(
            r#"{base}
            pool = {{ max_connections = 0, max_pending = 10000001, idle_timeout = "0s" }}

            [services.tcp]
            tls = "plaintext"
            protocol = "opaque"
            discovery = {{ kind = "static", endpoints = [{{ addr = "127.0.0.1:5432" }}] }}
            pool = {{ max_connections = 4 }}

            [[inbound]]
            name = "db"
            listen = "127.0.0.1:4144"
            target = "127.0.0.1:5432"
            tls = "plaintext"
            protocol = "opaque"
            pool = {{ max_pending = 1 }}
            "#
        )),
        &[
            "services.web.pool.max_connections: must be between 1 and 10000000",
            "services.web.pool.max_pending: at most 10000000",
            "services.web.pool.idle_timeout: must be greater than zero",
            "services.tcp.pool: bounds HTTP/1.1 connections",
            "inbound[0].pool: bounds HTTP/1.1 connections",
        ],
    );
}

/// An inbound listener's application must be an application: not a port-0 or unspecified
/// address, and not one of the proxy's own listeners (itself, through a wildcard address
/// too; the admin listener; an outbound listener).
#[test]
fn inbound_targets_are_not_the_proxys_own_listeners() {
    let errors = invalid(
        r#"
        [admin]
        listen = "127.0.0.1:9990"
        [[outbound]]
        name = "out"
        listen = "127.0.0.1:4140"
        [[inbound]]
        name = "a"
        listen = "0.0.0.0:4143"
        target = "127.0.0.1:4143"
        tls = "plaintext"
        [[inbound]]
        name = "b"
        listen = "[::]:4144"
        target = "127.0.0.1:9990"
        tls = "plaintext"
        [[inbound]]
        name = "c"
        listen = "0.0.0.0:4145"
        target = "127.0.0.1:4140"
        tls = "plaintext"
        [[inbound]]
        name = "d"
        listen = "0.0.0.0:4146"
        target = "127.0.0.1:0"
        tls = "plaintext"
        [[inbound]]
        name = "e"
        listen = "0.0.0.0:4147"
        target = "0.0.0.0:8080"
        tls = "plaintext"
        [[inbound]]
        name = "f"
        listen = "0.0.0.0:4148"
        target = "[::1]:4143" # 0.0.0.0:4143 takes IPv4 only: another socket
        tls = "plaintext"
        [[inbound]]
        name = "g"
        listen = "0.0.0.0:4150"
        target = "[::1]:4144"
        tls = "plaintext"
        [[inbound]]
        name = "h"
        listen = "0.0.0.0:4151"
        target = "[::ffff:127.0.0.1]:9990"
        tls = "plaintext"
        [[inbound]]
        name = "i"
        listen = "0.0.0.0:4152"
        target = "[::ffff:0.0.0.0]:8080"
        tls = "plaintext"
        [[inbound]]
        name = "ok"
        listen = "0.0.0.0:4149"
        target = "127.0.0.1:8080"
        tls = "plaintext"
        "#,
    );
    assert_exactly(
        &errors,
        &[
            "inbound[0].target: 127.0.0.1:4143 reaches this proxy's own listener 0.0.0.0:4143 (inbound[0].listen)",
            "inbound[1].target: 127.0.0.1:9990 reaches this proxy's own listener 127.0.0.1:9990 (admin.listen)",
            "inbound[2].target: 127.0.0.1:4140 reaches this proxy's own listener 127.0.0.1:4140 (outbound[0].listen)",
            "inbound[3].target: 127.0.0.1:0 is not an application's address",
            "inbound[4].target: 0.0.0.0:8080 is not an application's address",
            "inbound[6].target: [::1]:4144 reaches this proxy's own listener [::]:4144 (inbound[1].listen)",
            "inbound[7].target: [::ffff:127.0.0.1]:9990 reaches this proxy's own listener 127.0.0.1:9990 (admin.listen)",
            "inbound[8].target: [::ffff:0.0.0.0]:8080 is not an application's address",
        ],
    );
}

/// A plaintext service cannot verify an endpoint's identity: pinning one is refused, as
/// `server_identity` is.
#[test]
fn plaintext_services_take_no_endpoint_identities() {
    let errors = invalid(
        r#"
        [services.db]
        tls = "plaintext"
        discovery = { kind = "static", endpoints = [{ addr = "10.0.0.1:5432" }, { addr = "10.0.0.2:5432", identity = "spiffe://example.org/ns/prod/sa/db" }] }
        "#,
    );
    assert_exactly(
        &errors,
        &[
            "services.db.discovery.endpoints[1].identity: cannot be verified with tls = \"plaintext\"",
        ],
    );
}

/// The identity header is one of the application's own: never a field that frames,
/// routes or qualifies the message; and opaque listeners have none.
#[test]
fn identity_headers_are_not_fields_http_uses() {
    let listener = |i: usize, header: &str, protocol: &str| {
        format!(
            "[[inbound]]\nname = \"l{i}\"\nlisten = \"0.0.0.0:{}\"\ntarget = \"127.0.0.1:8080\"\n\
             tls = \"plaintext\"\nprotocol = \"{protocol}\"\nidentity_header = \"{header}\"\n",
            4000 + i
        )
    };
    let text: String = [
        ("content-length", "auto"),
        ("Host", "auto"),
        ("transfer-encoding", "http1"),
        ("grpc-status", "grpc"),
        ("x-client", "opaque"),
        ("x-client-id", "auto"),
    ]
    .iter()
    .enumerate()
    .map(|(i, (h, p))| listener(i, h, p))
    .collect();
    assert_exactly(
        &invalid(&text),
        &[
            "inbound[0].identity_header: `content-length` is a field HTTP itself uses",
            "inbound[1].identity_header: `Host` is a field HTTP itself uses",
            "inbound[2].identity_header: `transfer-encoding` is a field HTTP itself uses",
            "inbound[3].identity_header: `grpc-status` is a field HTTP itself uses",
            "inbound[4].identity_header: opaque listeners relay bytes",
        ],
    );
}

/// An opaque service relays connections: request settings are refused on it, and HTTP
/// requests (a route's backend, an HTTP listener's default) cannot go to it.
#[test]
fn opaque_services_take_no_requests() {
    let errors = invalid(
        r#"
        [services.db]
        protocol = "opaque"
        tls = "plaintext"
        discovery = { kind = "static", endpoints = [{ addr = "10.0.0.1:5432" }] }
        timeout = { request = "1s" }
        retry = { max_retries = 3 }
        [services.web]
        tls = "plaintext"
        discovery = { kind = "static", endpoints = [{ addr = "10.0.0.2:80" }] }
        [[routes]]
        name = "r"
        backends = [{ service = "web" }, { service = "db" }]
        [[outbound]]
        name = "auto"
        listen = "127.0.0.1:4140"
        default_service = "db"
        [[outbound]]
        name = "db"
        listen = "127.0.0.1:4141"
        protocol = "opaque"
        default_service = "db"
        "#,
    );
    assert_exactly(
        &errors,
        &[
            "services.db.retry: a setting for requests, and an opaque service relays connections",
            "services.db.timeout: a setting for requests",
            "routes[0].backends[1].service: `db` is an opaque service",
            "outbound[0].default_service: `db` is an opaque service (protocol = \"opaque\"): HTTP requests cannot go to it: set protocol = \"opaque\" on this listener",
        ],
    );
}
