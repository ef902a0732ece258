//! The allocator, table-driven: one allocator, a sequence of steps, each
//! with its expected outcome (MetalLB's style), and a property test of the
//! sharing invariant.

use std::net::IpAddr;

use lb_controller::ipam::*;
use proptest::prelude::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn svc(name: &str) -> ServiceKey {
    ServiceKey::new("default", name)
}

fn req(policy: FamilyPolicy) -> Request {
    Request {
        policy,
        addresses: vec![],
        pool: None,
        sharing_key: None,
        ports: vec![(80, Proto::Tcp)],
    }
}

fn v4() -> Request {
    req(FamilyPolicy::Single(Family::V4))
}

fn pools() -> Vec<Pool> {
    vec![
        Pool::new("public", &["192.0.2.0/30", "2001:db8::/127"], true, true).unwrap(),
        Pool::new("reserved", &["198.51.100.10-198.51.100.11"], false, false).unwrap(),
    ]
}

enum Step {
    Assign(
        &'static str,
        Request,
        Result<Vec<&'static str>, fn(&Refusal) -> bool>,
    ),
    Release(&'static str),
}

#[test]
fn sequence_against_one_allocator() {
    use Step::*;
    let shared = |key: &str, port: u16| Request {
        sharing_key: Some(key.into()),
        ports: vec![(port, Proto::Tcp)],
        ..v4()
    };
    let wanted = |addrs: &[&str], pool: Option<&str>| Request {
        addresses: addrs.iter().map(|a| ip(a)).collect(),
        pool: pool.map(Into::into),
        ..v4()
    };
    let steps = vec![
        // avoid_buggy_ips skips 192.0.2.0; first free is .1
        Assign("a", v4(), Ok(vec!["192.0.2.1"])),
        // idempotent
        Assign("a", v4(), Ok(vec!["192.0.2.1"])),
        Assign("b", v4(), Ok(vec!["192.0.2.2"])),
        // requested IP: in pool and free
        Assign("c", wanted(&["192.0.2.3"], None), Ok(vec!["192.0.2.3"])),
        // exhausted (v4 /30 minus .0 = 3 addresses)
        Assign(
            "d",
            v4(),
            Err(|r| {
                matches!(
                    r,
                    Refusal::Exhausted {
                        family: Family::V4,
                        ..
                    }
                )
            }),
        ),
        // requested: out of every pool
        Assign(
            "d",
            wanted(&["203.0.113.9"], None),
            Err(|r| matches!(r, Refusal::NotInAnyPool(_))),
        ),
        // requested: taken
        Assign(
            "d",
            wanted(&["192.0.2.1"], None),
            Err(|r| matches!(r, Refusal::InUse { .. })),
        ),
        // pool selection: a non-auto pool by annotation
        Assign(
            "d",
            Request {
                pool: Some("reserved".into()),
                ..v4()
            },
            Ok(vec!["198.51.100.10"]),
        ),
        Assign(
            "e",
            Request {
                pool: Some("nope".into()),
                ..v4()
            },
            Err(|r| matches!(r, Refusal::NoSuchPool(_))),
        ),
        Assign(
            "e",
            wanted(&["192.0.2.2"], Some("reserved")),
            Err(|r| matches!(r, Refusal::NotInPool { .. })),
        ),
        // sharing: same key, disjoint ports
        Assign(
            "s1",
            Request {
                pool: Some("reserved".into()),
                ..shared("k", 80)
            },
            Ok(vec!["198.51.100.11"]),
        ),
        Assign(
            "s2",
            Request {
                pool: Some("reserved".into()),
                ..shared("k", 443)
            },
            Ok(vec!["198.51.100.11"]),
        ),
        // sharing: same key, overlapping port
        Assign(
            "s3",
            Request {
                addresses: vec![ip("198.51.100.11")],
                ..shared("k", 443)
            },
            Err(|r| matches!(r, Refusal::PortConflict { port: 443, .. })),
        ),
        // sharing: another key
        Assign(
            "s3",
            Request {
                addresses: vec![ip("198.51.100.11")],
                ..shared("other", 8080)
            },
            Err(|r| matches!(r, Refusal::InUse { .. })),
        ),
        // release frees: b's address goes to e
        Release("b"),
        Assign("e", v4(), Ok(vec!["192.0.2.2"])),
        // dual-stack
        Assign(
            "dual",
            req(FamilyPolicy::RequireDual(Family::V6)),
            Err(|r| {
                matches!(
                    r,
                    Refusal::Exhausted {
                        family: Family::V4,
                        ..
                    }
                )
            }),
        ),
        Release("c"),
        Assign(
            "dual",
            req(FamilyPolicy::RequireDual(Family::V6)),
            Ok(vec!["2001:db8::", "192.0.2.3"]),
        ),
        Assign(
            "prefer",
            req(FamilyPolicy::PreferDual(Family::V4)),
            Ok(vec!["2001:db8::1"]),
        ),
        Assign(
            "v6only",
            req(FamilyPolicy::Single(Family::V6)),
            Err(|r| {
                matches!(
                    r,
                    Refusal::Exhausted {
                        family: Family::V6,
                        ..
                    }
                )
            }),
        ),
        Assign(
            "x",
            Request {
                addresses: vec![ip("2001:db8::1")],
                ..v4()
            },
            Err(|r| matches!(r, Refusal::FamilyMismatch(_))),
        ),
    ];
    let mut a = Allocator::new(pools());
    for (i, step) in steps.into_iter().enumerate() {
        match step {
            Assign(name, request, expected) => {
                let before = a.holdings();
                let got = a.assign(&svc(name), &request);
                match (got, expected) {
                    (Ok(mut ips), Ok(want)) => {
                        ips.sort();
                        let mut want: Vec<IpAddr> = want.iter().map(|s| ip(s)).collect();
                        want.sort();
                        assert_eq!(ips, want, "step {i}: {name}");
                    }
                    (Err(e), Err(check)) => {
                        assert!(check(&e), "step {i}: {name}: unexpected refusal {e}");
                        assert_eq!(a.holdings(), before, "step {i}: a refusal changed state");
                    }
                    (got, _) => panic!("step {i}: {name}: got {got:?}"),
                }
            }
            Release(name) => {
                a.release(&svc(name));
            }
        }
    }
    assert_eq!(a.usage("public", Family::V4), Some((3, 3)));
    assert_eq!(a.usage("reserved", Family::V4), Some((2, 2)));
}

#[test]
fn reseed_from_status_gives_the_same_assignments() {
    let mut a = Allocator::new(pools());
    let services = ["a", "b", "c"];
    let mut status = Vec::new();
    for s in services {
        status.push((s, a.assign(&svc(s), &v4()).unwrap()));
    }
    // A restart: a new allocator seeded from status, assigned Services first.
    let mut b = Allocator::new(pools());
    for (s, ips) in &status {
        b.seed(&svc(s), ips, &v4());
    }
    for (s, ips) in &status {
        assert_eq!(
            &b.assign(&svc(s), &v4()).unwrap(),
            ips,
            "{s} moved after reseed"
        );
    }
    assert_eq!(a.holdings(), b.holdings());
    // Seeding is idempotent.
    for (s, ips) in &status {
        b.seed(&svc(s), ips, &v4());
    }
    assert_eq!(a.holdings(), b.holdings());
}

#[test]
fn pool_edits_keep_orphaned_addresses() {
    let mut a = Allocator::new(pools());
    let held = a.assign(&svc("a"), &v4()).unwrap();
    let orphans = a.set_pools(vec![
        Pool::new("public", &["192.0.2.128/25"], true, true).unwrap()
    ]);
    assert_eq!(orphans, vec![(svc("a"), held[0])]);
    assert_eq!(a.assign(&svc("a"), &v4()).unwrap(), held, "never yanked");
    assert_eq!(a.assign(&svc("b"), &v4()).unwrap(), vec![ip("192.0.2.128")]);
}

#[test]
fn ranges_parse_and_refuse() {
    assert!(AddrRange::parse("192.0.2.0/28").is_ok());
    assert!(AddrRange::parse("198.51.100.10-198.51.100.20").is_ok());
    assert!(AddrRange::parse("2001:db8::/120").is_ok());
    for bad in [
        "192.0.2.1/28",
        "10.0.0.5-10.0.0.1",
        "10.0.0.1-2001:db8::1",
        "nope",
        "10.0.0.0/33",
    ] {
        assert!(AddrRange::parse(bad).is_err(), "{bad}");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Assign {
        service: u8,
        key: Option<u8>,
        port: u16,
        requested: Option<u8>,
    },
    Release {
        service: u8,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (
            0u8..8,
            proptest::option::of(0u8..2),
            1u16..4,
            proptest::option::of(0u8..6)
        )
            .prop_map(|(service, key, port, requested)| Op::Assign {
                service,
                key,
                port,
                requested
            }),
        (0u8..8).prop_map(|service| Op::Release { service }),
    ]
}

proptest! {
    /// No address is ever held by two Services unless their sharing keys
    /// match and their ports do not overlap.
    #[test]
    fn sharing_invariant_holds(ops in proptest::collection::vec(op(), 1..60)) {
        let mut a = Allocator::new(vec![Pool::new("p", &["10.0.0.0-10.0.0.5"], true, false).unwrap()]);
        for op in ops {
            match op {
                Op::Assign { service, key, port, requested } => {
                    let request = Request {
                        policy: FamilyPolicy::Single(Family::V4),
                        addresses: requested.map(|n| vec![IpAddr::from([10, 0, 0, n])]).unwrap_or_default(),
                        pool: None,
                        sharing_key: key.map(|k| format!("key{k}")),
                        ports: vec![(port, Proto::Tcp)],
                    };
                    let _ = a.assign(&ServiceKey::new("ns", &format!("s{service}")), &request);
                }
                Op::Release { service } => {
                    a.release(&ServiceKey::new("ns", &format!("s{service}")));
                }
            }
            let holdings = a.holdings();
            for (i, x) in holdings.iter().enumerate() {
                for y in &holdings[i + 1..] {
                    if x.ip == y.ip && x.service != y.service {
                        prop_assert!(x.sharing_key.is_some() && x.sharing_key == y.sharing_key, "{} shared without a common key: {x:?} {y:?}", x.ip);
                        prop_assert!(x.ports.iter().all(|p| !y.ports.contains(p)), "{} shared with overlapping ports", x.ip);
                    }
                }
            }
        }
    }
}
