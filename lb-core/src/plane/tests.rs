//! Tests of applying configurations to a running plane.

use super::*;

fn listeners(text: &str) -> Vec<Listener> {
    lb_config::parse_config(text).unwrap().listeners
}

/// An apply that changes one listener leaves every other listener's
/// route (selector, handles, counters) as it was, and bumps the
/// generation once.
#[test]
fn unchanged_listeners_keep_their_routes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Shared::new(Vec::new(), 100, false));
    let mut plane = Plane::new(shared.clone(), Vec::new(), rt.handle().clone());
    let a = "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [{ addr = \"127.0.0.2:80\" }]\n[listener.health]\nkind = \"none\"\n";
    let b = "[[listener]]\nname = \"b\"\nbind = \"127.0.0.9:0\"\nbackends = [{ addr = \"127.0.0.3:80\" }]\n[listener.health]\nkind = \"none\"\n";
    let first = listeners(&format!("{a}{b}"));
    let _guard = rt.enter();
    plane.apply(&first).unwrap();
    let before = shared.routing.load_full();
    let mut second = first.clone();
    second[1].backends[0].weight = 5;
    let applied = plane.apply(&second).unwrap();
    let after = shared.routing.load_full();
    assert_eq!(applied.generation, before.generation + 1);
    let key = |l: &Listener| BindKey::of(l);
    assert!(
        Arc::ptr_eq(
            &before.routes[&key(&first[0])],
            &after.routes[&key(&first[0])]
        ),
        "listener a did not change: its route is the same one"
    );
    let (old_b, new_b) = (
        &before.routes[&key(&first[1])],
        &after.routes[&key(&first[1])],
    );
    assert!(!Arc::ptr_eq(old_b, new_b), "listener b changed");
    assert!(
        !Arc::ptr_eq(&old_b.selector, &new_b.selector),
        "its weights changed"
    );
    assert!(
        Arc::ptr_eq(&old_b.backends[0], &new_b.backends[0]),
        "same backend handle"
    );
    assert!(Arc::ptr_eq(&old_b.stats, &new_b.stats), "same counters");
}
