//! The NIC's counters in `GET /metrics` and FlushMetrics' JSON line: the virtio-net device's
//! frames, bytes, drops and stalls, and the egress filter's connections, bytes and DNS queries.

use devices::virtio::net::NetCounts;
use egress::EgressStats;

use super::metrics::Text;

/// Both sets of counters at one moment.
pub type NetSnapshot = (NetCounts, EgressStats);

/// The `"net"` object of the JSON line.
pub fn json((device, egress): &NetSnapshot) -> serde_json::Value {
    serde_json::json!({
        "tx_frames": device.tx_frames, "tx_bytes": device.tx_bytes,
        "rx_frames": device.rx_frames, "rx_bytes": device.rx_bytes,
        "dropped": drops(device).iter().map(|(cause, direction, n)| {
            serde_json::json!({ "cause": cause, "direction": direction, "count": n })
        }).collect::<Vec<_>>(),
        "tx_stalls": device.tx_stalls, "rx_stalls": device.rx_stalls,
        "egress": {
            "connections_allowed": egress.connections_allowed,
            "connections_denied": egress.connections_denied,
            "bytes_up": egress.bytes_up, "bytes_down": egress.bytes_down,
            "dns_queries": egress.dns_queries,
        },
    })
}

/// The Prometheus families. Their own names rather than `agentvm_device_*{device="net"}`: those
/// families' HELP and TYPE lines are written with the vsock samples, and a family's lines must
/// stay together.
pub(super) fn prometheus(text: &mut Text, (device, egress): &NetSnapshot) {
    let directional = [
        (
            "agentvm_net_frames_total",
            "Ethernet frames through the NIC: tx guest to host, rx host to guest.",
            device.tx_frames,
            device.rx_frames,
        ),
        (
            "agentvm_net_bytes_total",
            "Ethernet frame bytes through the NIC: tx guest to host, rx host to guest.",
            device.tx_bytes,
            device.rx_bytes,
        ),
        (
            "agentvm_net_stalls_total",
            "Times the NIC stopped moving frames until the other side drained: tx the frame \
             socket full, rx no guest buffer.",
            device.tx_stalls,
            device.rx_stalls,
        ),
    ];
    for (name, help, tx, rx) in directional {
        text.family(name, "counter", help);
        for (direction, n) in [("tx", tx), ("rx", rx)] {
            text.sample(name, &[("direction", direction.into())], n);
        }
    }
    const DROPPED: &str = "agentvm_net_dropped_frames_total";
    text.family(
        DROPPED,
        "counter",
        "Frames the NIC dropped, by cause and direction.",
    );
    for (cause, direction, n) in drops(device) {
        let labels = [("cause", cause.into()), ("direction", direction.into())];
        text.sample(DROPPED, &labels, n);
    }
    const CONNECTIONS: &str = "agentvm_egress_connections_total";
    text.family(
        CONNECTIONS,
        "counter",
        "Guest connections judged by the egress policy, by decision.",
    );
    for (decision, n) in [
        ("allowed", egress.connections_allowed),
        ("denied", egress.connections_denied),
    ] {
        text.sample(CONNECTIONS, &[("decision", decision.into())], n);
    }
    const BYTES: &str = "agentvm_egress_bytes_total";
    text.family(
        BYTES,
        "counter",
        "Payload bytes the egress filter carried: up guest to upstream, down upstream to guest.",
    );
    for (direction, n) in [("up", egress.bytes_up), ("down", egress.bytes_down)] {
        text.sample(BYTES, &[("direction", direction.into())], n);
    }
    const DNS: &str = "agentvm_egress_dns_queries_total";
    text.family(DNS, "counter", "DNS queries the VMM's resolver answered.");
    text.sample(DNS, &[], egress.dns_queries);
}

fn drops(device: &NetCounts) -> [(&'static str, &'static str, u64); 6] {
    [
        ("malformed", "tx", device.tx_dropped_malformed),
        ("oversized", "tx", device.tx_dropped_oversized),
        ("backend", "tx", device.tx_dropped_backend),
        ("oversized", "rx", device.rx_dropped_oversized),
        ("runt", "rx", device.rx_dropped_runt),
        ("malformed", "rx", device.rx_dropped_malformed),
    ]
}
