//! The counted design figures of an RDMA run: the work per piece on each side, read from the
//! counters the engine keeps (`ferry_rdma_work_total`, windows, serve reads). They do not
//! depend on speed, so they mean the same on soft-RoCE and on a 400 Gbit/s NIC.

use serde_json::{json, Value};

/// One sample of the Prometheus text `text`: the line starting with `name` (labels included).
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn work(text: &str, side: &str, kind: &str) -> f64 {
    sample(
        text,
        &format!(r#"ferry_rdma_work_total{{side="{side}",work="{kind}"}}"#),
    )
}

/// The figures per piece for `pieces` pieces moved, from the metrics text of both sides.
pub fn per_piece(text: &str, pieces: u64) -> Value {
    let n = pieces.max(1) as f64;
    let side = |side: &str| {
        json!({
            "send_requests": work(text, side, "send_requests") / n,
            "signalled_completions": work(text, side, "signalled") / n,
            "completions": work(text, side, "completions") / n,
            "wakeups": work(text, side, "wakeups") / n,
            "messages_sent": work(text, side, "messages_sent") / n,
            "messages_received": work(text, side, "messages_received") / n,
        })
    };
    let reads = sample(text, "ferry_serve_reads_total");
    json!({
        "pieces": pieces,
        // Nothing is written on the set-up connection after Accept (a byte read there ends
        // the session), so this is the design, not a sample.
        "tcp_messages_per_piece_after_set_up": 0,
        "receiver": side("fetching"),
        "source": side("serving"),
        "windows_invalidated_by_peer": sample(text, r#"ferry_rdma_windows_invalidated_total{by="peer"}"#) / n,
        "windows_invalidated_locally": sample(text, r#"ferry_rdma_windows_invalidated_total{by="local"}"#) / n,
        "source_reads": reads / n,
        "source_payload_copies": sample(text, "ferry_serve_payload_copies_total") / n,
        // Each stripe of a piece striped over rail pairs is one fetch: one request, one
        // answer and one memory window on its pair.
        "pieces_striped": sample(text, "ferry_rdma_pieces_striped_total") / n,
        "stripes_per_striped_piece": sample(text, "ferry_rdma_stripes_total")
            / sample(text, "ferry_rdma_pieces_striped_total").max(1.0),
        // The receiver hashes the bytes the NIC wrote once; the source sends the digest it
        // stored at import.
        "digest_passes": { "receiver": 1, "source": 0 },
        "peak_in_flight": {
            "receiver": sample(text, r#"ferry_rdma_peak_pieces_in_flight{side="fetching"}"#),
            "source": sample(text, r#"ferry_rdma_peak_pieces_in_flight{side="serving"}"#),
        },
    })
}

/// Prints `figures` (from [`per_piece`]) as a short block.
pub fn print(figures: &Value) {
    let f = |v: &Value| v.as_f64().unwrap_or_default();
    println!("counted work per piece ({} pieces):", figures["pieces"]);
    println!(
        "  TCP messages after set-up: {}",
        figures["tcp_messages_per_piece_after_set_up"]
    );
    for (name, key) in [("receiver", "receiver"), ("source  ", "source")] {
        let side = &figures[key];
        println!(
            "  {name}: {:.2} send requests, {:.2} signalled, {:.2} completions, {:.2} wake-ups, {:.2} messages out, {:.2} in",
            f(&side["send_requests"]),
            f(&side["signalled_completions"]),
            f(&side["completions"]),
            f(&side["wakeups"]),
            f(&side["messages_sent"]),
            f(&side["messages_received"]),
        );
    }
    println!(
        "  windows taken back: {:.2} by the source's SEND_WITH_INVALIDATE, {:.2} locally",
        f(&figures["windows_invalidated_by_peer"]),
        f(&figures["windows_invalidated_locally"])
    );
    println!(
        "  source: {:.2} store reads, {:.2} CPU copies of payload (0 with O_DIRECT); digest passes: receiver 1, source 0",
        f(&figures["source_reads"]),
        f(&figures["source_payload_copies"])
    );
    println!(
        "  striped over rail pairs: {:.0}% of pieces, {:.2} stripes each",
        f(&figures["pieces_striped"]) * 100.0,
        f(&figures["stripes_per_striped_piece"])
    );
    println!(
        "  peak pieces in flight on one queue pair: receiver {}, source {}",
        figures["peak_in_flight"]["receiver"], figures["peak_in_flight"]["source"]
    );
}

/// Bytes each local rail carried in `direction` ("in": fetched, "out": served), from
/// `ferry_rdma_rail_bytes_total`, in the order the rails first appear.
pub fn rail_bytes(text: &str, direction: &str) -> Vec<(String, f64)> {
    let tail = format!(r#"",direction="{direction}"}}"#);
    text.lines()
        .filter_map(|line| {
            let labels = line.strip_prefix(r#"ferry_rdma_rail_bytes_total{rail=""#)?;
            let (rail, value) = labels.split_once(&tail)?;
            Some((rail.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rail_bytes_are_read_by_rail_and_direction() {
        let text = "# HELP ferry_rdma_rail_bytes_total Piece bytes\n\
            ferry_rdma_rail_bytes_total{rail=\"rxe1:1\",direction=\"in\"} 100\n\
            ferry_rdma_rail_bytes_total{rail=\"rxe0:1\",direction=\"out\"} 100\n\
            ferry_rdma_rail_bytes_total{rail=\"rxe3:1\",direction=\"in\"} 50\n\
            ferry_rdma_rail_pieces_total{rail=\"rxe3:1\",direction=\"in\"} 2\n";
        assert_eq!(
            rail_bytes(text, "in"),
            vec![("rxe1:1".to_owned(), 100.0), ("rxe3:1".to_owned(), 50.0)]
        );
        assert_eq!(rail_bytes(text, "out"), vec![("rxe0:1".to_owned(), 100.0)]);
    }
}
