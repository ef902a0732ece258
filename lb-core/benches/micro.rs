//! Micro-benchmarks of the per-connection and per-datagram decisions:
//! Maglev table build and lookup, and the UDP flow table.
//! Run with `cargo bench -p lb-core --bench micro`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use lb_core::balance::hash::{client_ip_key, five_tuple_key};
use lb_core::balance::maglev::Maglev;
use lb_core::udp::flow::FlowTable;

fn backends(n: u32) -> Vec<(SocketAddr, u32)> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(0x0a00_0000 + i);
            (SocketAddr::from((ip, 30_000)), 1 + i % 3)
        })
        .collect()
}

fn client(i: u32) -> SocketAddr {
    SocketAddr::from((
        Ipv4Addr::from(0xc0a8_0000 + (i >> 8)),
        1024 + (i & 0xff) as u16,
    ))
}

fn maglev(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev");
    for n in [3u32, 16, 100] {
        let set = backends(n);
        g.bench_with_input(BenchmarkId::new("build", n), &set, |b, set| {
            b.iter(|| Maglev::build(black_box(set)))
        });
    }
    let table = Maglev::build(&backends(16)).expect("weighted backends");
    let local = SocketAddr::from(([127, 0, 0, 1], 443));
    let mut i = 0u32;
    g.bench_function("lookup five-tuple", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            table.lookup(five_tuple_key(black_box(client(i)), local, 6))
        })
    });
    g.bench_function("lookup client-ip", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            table.lookup(client_ip_key(black_box(client(i)).ip()))
        })
    });
    g.finish();
}

fn flow_table(c: &mut Criterion) {
    const FLOWS: u32 = 10_000;
    let now = Instant::now();
    let full = || {
        let mut t = FlowTable::default();
        for i in 0..FLOWS {
            t.insert(client(i), i, now);
        }
        t
    };
    let mut g = c.benchmark_group("flow_table");
    let mut t = full();
    let mut i = 0u32;
    g.bench_function("touch hit (10k flows)", |b| {
        b.iter(|| {
            i = (i + 1) % FLOWS;
            t.touch(black_box(client(i)), now).map(|v| *v)
        })
    });
    g.bench_function("touch miss + insert + remove", |b| {
        b.iter(|| {
            let c = client(FLOWS + 1);
            if t.touch(c, now).is_none() {
                t.insert(c, 0, now);
            }
            t.remove(black_box(c))
        })
    });
    g.bench_function("expire sweep (10k flows, half idle)", |b| {
        b.iter_batched(
            || {
                let mut t = full();
                let later = now + Duration::from_secs(30);
                for i in (0..FLOWS).step_by(2) {
                    t.touch(client(i), later);
                }
                t
            },
            |mut t| {
                t.expire(
                    now + Duration::from_secs(40),
                    Duration::from_secs(20),
                    |_| false,
                )
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, maglev, flow_table);
criterion_main!(benches);
