//! Transparent mode's metrics per original destination: connections, events in (committed),
//! events out (acked upstream), and what is queued for it. Labels are bounded: the first
//! [`MAX_DESTINATION_LABELS`] destinations get one of their own, the rest share "other", so a
//! sender scanning addresses cannot grow the metrics without bound.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Mutex, MutexGuard};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{label, Labels};
use crate::spool::Queued;

/// Original destinations with a metric label of their own.
pub const MAX_DESTINATION_LABELS: usize = 256;
/// The label shared by destinations beyond the bound.
const OTHER: &str = "other";

#[derive(Default)]
pub struct DestinationMetrics {
    connections: Family<Labels, Counter>,
    events_in: Family<Labels, Counter>,
    events_out: Family<Labels, Counter>,
    queued_records: Family<Labels, Gauge>,
    queued_bytes: Family<Labels, Gauge>,
    /// Every `destination` label given out so far, for the admin API.
    shown: Mutex<BTreeSet<String>>,
}

/// One destination's figures, as the admin API shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationCounts {
    pub destination: String,
    pub connections: u64,
    pub events_in: u64,
    pub events_out: u64,
    pub queued_records: u64,
    pub queued_bytes: u64,
}

impl DestinationMetrics {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "destination_connections",
            "Redirected sender connections accepted (ingress.transparent), by original destination",
            self.connections.clone(),
        );
        r.register(
            "destination_events_in",
            "Events committed from redirected connections, by original destination",
            self.events_in.clone(),
        );
        r.register(
            "destination_events_out",
            "Events of redirected connections acked upstream, by original destination",
            self.events_out.clone(),
        );
        r.register(
            "destination_queued_records",
            "Spool records waiting for an upstream ack, by original destination",
            self.queued_records.clone(),
        );
        r.register(
            "destination_queued_bytes",
            "Stored bytes of the spool records waiting for an upstream ack, by original destination",
            self.queued_bytes.clone(),
        );
    }

    fn shown(&self) -> MutexGuard<'_, BTreeSet<String>> {
        self.shown.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The label `destination` is counted under (registering it if there is room).
    fn label_for(&self, destination: SocketAddr) -> Labels {
        let destination = crate::middlebox::canonical_addr(destination).to_string();
        let mut shown = self.shown();
        let name = if shown.contains(&destination) || shown.len() < MAX_DESTINATION_LABELS {
            shown.insert(destination.clone());
            destination
        } else {
            shown.insert(OTHER.to_string());
            OTHER.to_string()
        };
        label("destination", &name)
    }

    /// Count a redirected connection to `destination`; the counter its committed events go to.
    pub fn connection(&self, destination: SocketAddr) -> Counter {
        let name = self.label_for(destination);
        self.connections.get_or_create(&name).inc();
        self.events_in.get_or_create(&name).clone()
    }

    /// Count the events of an acked record that carried `destination`.
    pub fn delivered(&self, destination: SocketAddr, events: u64) {
        let name = self.label_for(destination);
        self.events_out.get_or_create(&name).inc_by(events);
    }

    /// Set the queued gauges from the spool's counts (before a scrape or a status read).
    /// Destinations with nothing queued any more are set to 0.
    pub fn set_queued(&self, queued: &[(SocketAddr, Queued)]) {
        let mut by_label: std::collections::BTreeMap<Labels, Queued> = Default::default();
        for (destination, q) in queued {
            let sum = by_label.entry(self.label_for(*destination)).or_default();
            sum.records += q.records;
            sum.bytes += q.bytes;
        }
        let shown = self.shown().clone();
        for name in shown {
            let name = label("destination", &name);
            let q = by_label.get(&name).copied().unwrap_or_default();
            let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            self.queued_records
                .get_or_create(&name)
                .set(gauge(q.records));
            self.queued_bytes.get_or_create(&name).set(gauge(q.bytes));
        }
    }

    /// Every destination labelled so far.
    pub fn counts(&self) -> Vec<DestinationCounts> {
        let shown = self.shown().clone();
        shown
            .into_iter()
            .map(|destination| {
                let name = label("destination", &destination);
                let gauge = |family: &Family<Labels, Gauge>| {
                    u64::try_from(family.get_or_create(&name).get()).unwrap_or(0)
                };
                DestinationCounts {
                    connections: self.connections.get_or_create(&name).get(),
                    events_in: self.events_in.get_or_create(&name).get(),
                    events_out: self.events_out.get_or_create(&name).get(),
                    queued_records: gauge(&self.queued_records),
                    queued_bytes: gauge(&self.queued_bytes),
                    destination,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(counts: &'a [DestinationCounts], name: &str) -> &'a DestinationCounts {
        counts
            .iter()
            .find(|c| c.destination == name)
            .unwrap_or_else(|| panic!("no {name} in {counts:?}"))
    }

    #[test]
    fn labels_are_bounded_and_ipv4_mapped_addresses_are_shown_as_ipv4() {
        let m = DestinationMetrics::default();
        let first: SocketAddr = "[::ffff:192.0.2.1]:24224".parse().unwrap();
        m.connection(first).inc_by(3);
        for port in 0..(MAX_DESTINATION_LABELS as u16 + 10) {
            m.connection(SocketAddr::new("198.51.100.1".parse().unwrap(), port));
        }
        m.connection("203.0.113.9:24224".parse().unwrap());
        // One already labelled keeps its label.
        m.connection("192.0.2.1:24224".parse().unwrap());
        let counts = m.counts();
        assert_eq!(counts.len(), MAX_DESTINATION_LABELS + 1);
        let kept = find(&counts, "192.0.2.1:24224");
        assert_eq!((kept.connections, kept.events_in), (2, 3));
        // 266 ports: 255 fit beside the first destination, 11 do not; plus 203.0.113.9.
        assert_eq!(find(&counts, OTHER).connections, 12);
    }

    #[test]
    fn queued_follows_the_spool_counts_and_drops_to_zero_when_drained() {
        let m = DestinationMetrics::default();
        let a: SocketAddr = "192.0.2.1:24224".parse().unwrap();
        let b: SocketAddr = "[2001:db8::1]:24224".parse().unwrap();
        m.connection(a);
        m.delivered(a, 5);
        let q = |records, bytes| Queued { records, bytes };
        // B was never connected to (records found in the spool after a restart): labelled.
        m.set_queued(&[(a, q(2, 200)), (b, q(1, 50))]);
        let counts = m.counts();
        let at_a = find(&counts, "192.0.2.1:24224");
        assert_eq!(
            (at_a.events_out, at_a.queued_records, at_a.queued_bytes),
            (5, 2, 200)
        );
        assert_eq!(find(&counts, "[2001:db8::1]:24224").queued_records, 1);
        m.set_queued(&[(b, q(1, 50))]);
        assert_eq!(find(&m.counts(), "192.0.2.1:24224").queued_records, 0);
    }
}
