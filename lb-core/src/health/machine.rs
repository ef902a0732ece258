//! The health state machine: consecutive results in, transitions out.
//! Pure: the caller passes `now` and gets back what changed.
//!
//! A new backend starts *up, unconfirmed*: it takes traffic at once (a
//! reload must not black-hole a listener while checks warm up), but the very
//! first failure, active or passive, takes it down without waiting for
//! `fall`. After its first success it follows `rise`/`fall` strictly.
//! See docs/design/0002-initial-health.md.

use std::time::Instant;

/// Whether a backend receives new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// Receives traffic.
    Up,
    /// Receives no traffic (unless every backend is down and the listener fails open).
    Down,
}

/// A change the caller should act on and log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The state before.
    pub from: Health,
    /// The state now.
    pub to: Health,
}

/// Counts consecutive results against `rise` and `fall`.
#[derive(Clone, Debug)]
pub struct HealthMachine {
    rise: u32,
    fall: u32,
    state: Health,
    confirmed: bool,
    streak: u32,
    since: Instant,
}

impl HealthMachine {
    /// A new backend: up, unconfirmed, since `now`.
    pub fn new(rise: u32, fall: u32, now: Instant) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            state: Health::Up,
            confirmed: false,
            streak: 0,
            since: now,
        }
    }

    /// Current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Records one result; returns the transition it caused, if any.
    pub fn observe(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        let from = self.state;
        match (self.state, ok) {
            (Health::Up, true) => {
                self.confirmed = true;
                self.streak = 0;
            }
            (Health::Up, false) => {
                self.streak += 1;
                if !self.confirmed || self.streak >= self.fall {
                    self.state = Health::Down;
                    self.streak = 0;
                }
            }
            (Health::Down, true) => {
                self.streak += 1;
                if self.streak >= self.rise {
                    self.state = Health::Up;
                    self.confirmed = true;
                    self.streak = 0;
                }
            }
            (Health::Down, false) => self.streak = 0,
        }
        (self.state != from).then(|| {
            self.since = now;
            Transition {
                from,
                to: self.state,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn flips_after_exactly_rise_and_fall() {
        let t0 = Instant::now();
        for rise in 1..5 {
            for fall in 1..5 {
                let mut m = HealthMachine::new(rise, fall, t0);
                assert_eq!(m.observe(true, t0), None);
                for k in 1..fall {
                    assert_eq!(m.observe(false, t0), None, "fell early at {k}/{fall}");
                }
                let t1 = t0 + Duration::from_secs(1);
                assert_eq!(
                    m.observe(false, t1),
                    Some(Transition {
                        from: Health::Up,
                        to: Health::Down
                    })
                );
                assert_eq!(m.since(), t1);
                for k in 1..rise {
                    assert_eq!(m.observe(true, t1), None, "rose early at {k}/{rise}");
                }
                assert_eq!(
                    m.observe(true, t1),
                    Some(Transition {
                        from: Health::Down,
                        to: Health::Up
                    })
                );
            }
        }
    }

    #[test]
    fn a_success_resets_the_failure_streak() {
        let t = Instant::now();
        let mut m = HealthMachine::new(2, 3, t);
        m.observe(true, t);
        m.observe(false, t);
        m.observe(false, t);
        m.observe(true, t);
        m.observe(false, t);
        m.observe(false, t);
        assert_eq!(m.state(), Health::Up);
        m.observe(false, t);
        assert_eq!(m.state(), Health::Down);
        // ... and a failure resets the success streak.
        m.observe(true, t);
        m.observe(false, t);
        m.observe(true, t);
        assert_eq!(m.state(), Health::Down);
        m.observe(true, t);
        assert_eq!(m.state(), Health::Up);
    }

    #[test]
    fn unconfirmed_backend_falls_on_first_failure() {
        let t = Instant::now();
        let mut m = HealthMachine::new(2, 3, t);
        assert_eq!(m.state(), Health::Up);
        assert!(m.observe(false, t).is_some());
        assert_eq!(m.state(), Health::Down);
    }

    proptest::proptest! {
        /// After its first success, the machine goes down on exactly the
        /// `fall`th failure in a row and up on exactly the `rise`th success
        /// in a row, whatever came before; a model counting streaks agrees
        /// with it on every step of any sequence of results.
        #[test]
        fn flips_after_exactly_rise_and_fall_in_any_sequence(
            rise in 1u32..6,
            fall in 1u32..6,
            results in proptest::collection::vec(proptest::bool::ANY, 0..200),
        ) {
            let t = Instant::now();
            let mut m = HealthMachine::new(rise, fall, t);
            m.observe(true, t); // confirmed
            let (mut up, mut streak) = (true, 0u32);
            for (step, ok) in results.into_iter().enumerate() {
                let flipped = match (up, ok) {
                    (true, false) | (false, true) => {
                        streak += 1;
                        let limit = if up { fall } else { rise };
                        if streak == limit {
                            up = !up;
                            streak = 0;
                            true
                        } else {
                            false
                        }
                    }
                    _ => {
                        streak = 0;
                        false
                    }
                };
                let t = m.observe(ok, t);
                proptest::prop_assert_eq!(t.is_some(), flipped, "step {}", step);
                let expected = if up { Health::Up } else { Health::Down };
                proptest::prop_assert_eq!(m.state(), expected, "step {}", step);
            }
        }
    }
}
