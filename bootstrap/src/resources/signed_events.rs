//! The `signed_events_chain` check probe: ai-memory 0.7.0's tamper-evident audit chain in one
//! peer store on the pg node, recomputed from the stored rows the way ai-memory computes it.
//!
//! What 0.7.0 writes (paths under ai-memory-0.7.0/): on postgres, every appended row takes the row
//! with the highest `sequence` as its predecessor and stores `prev_hash` = SHA-256 of that row's
//! [`canonical_bytes`] and `sequence` = its sequence + 1; the first row stores 32 zero bytes and
//! sequence 1 (src/store/postgres.rs:7019-7052, genesis at :7032; `ZERO_HASH`
//! src/signed_events.rs:306). The timestamp enters the hash as chrono's `to_rfc3339()` of the
//! TIMESTAMPTZ read back (postgres.rs:7042). [`verify`] applies `verify_chain`'s two rules
//! (src/signed_events.rs:597-613): each row's sequence is its rank, each prev_hash the hash of the
//! row before. (0.7.0's own `verify-signed-events` command reads only SQLite, and no HTTP route
//! exposes the chain, so the pg node is where it can be checked.)

use sha2::{Digest, Sha256};

/// One `signed_events` row as stored (sequence and prev_hash are NULL on rows a pre-v33 backfill
/// missed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    pub agent_id: String,
    pub event_type: String,
    pub payload_hash: Vec<u8>,
    pub signature: Option<Vec<u8>>,
    pub attest_level: String,
    /// The TIMESTAMPTZ, microseconds since the Unix epoch.
    pub timestamp_us: i64,
    pub prev_hash: Option<Vec<u8>>,
    pub sequence: Option<i64>,
}

/// The rows in chain order, as [`Row`] fields (the timestamp as microseconds, exact: `extract`
/// answers numeric since PostgreSQL 14).
const SELECT: &str = "SELECT id, agent_id, event_type, payload_hash, signature, attest_level, \
                      (extract(epoch FROM \"timestamp\") * 1000000)::int8, prev_hash, sequence \
                      FROM {table} ORDER BY sequence ASC NULLS FIRST";

/// ai-memory's `canonical_chain_bytes` (src/signed_events.rs:327-359): the text fields, the
/// payload hash, the signature (nothing when NULL), each followed by 0x1F, then the sequence as
/// 8 bytes big-endian.
pub fn canonical_bytes(row: &Row) -> Result<Vec<u8>, String> {
    const SEP: u8 = 0x1F;
    let sequence = row.sequence.ok_or("sequence is NULL")?;
    let mut out = Vec::new();
    for field in [
        row.id.as_bytes(),
        row.agent_id.as_bytes(),
        row.event_type.as_bytes(),
        &row.payload_hash,
        row.signature.as_deref().unwrap_or_default(),
        row.attest_level.as_bytes(),
        rfc3339(row.timestamp_us)?.as_bytes(),
    ] {
        out.extend_from_slice(field);
        out.push(SEP);
    }
    out.extend_from_slice(&sequence.to_be_bytes());
    Ok(out)
}

/// chrono 0.4's `DateTime<Utc>::to_rfc3339()` (`SecondsFormat::AutoSi`, no `Z`: chrono-0.4.44
/// src/format/formatting.rs:504-552) for a value PostgreSQL stores to the microsecond: the
/// fraction has 0, 3 or 6 digits, the offset is `+00:00`.
pub fn rfc3339(micros: i64) -> Result<String, String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|e| format!("timestamp {micros} us: {e}"))?;
    let year = t.year();
    let year = if (0..=9999).contains(&year) {
        format!("{year:04}")
    } else {
        format!("{year:+05}")
    };
    let fraction = match t.microsecond() {
        0 => String::new(),
        us if us % 1000 == 0 => format!(".{:03}", us / 1000),
        us => format!(".{us:06}"),
    };
    Ok(format!(
        "{year}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}+00:00",
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

/// Where a chain breaks: the first row (1-based rank) that breaks it and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    pub rank: usize,
    pub why: String,
}

/// The chain over rows in `sequence` order: its length, or the first break.
pub fn verify(rows: &[Row]) -> Result<usize, Break> {
    let mut want = [0u8; 32];
    for (i, row) in rows.iter().enumerate() {
        let rank = i + 1;
        let broken = |why: String| Break { rank, why };
        match row.sequence {
            Some(s) if s == rank as i64 => {}
            Some(s) => return Err(broken(format!("sequence {s} where {rank} belongs"))),
            None => return Err(broken("sequence is NULL".into())),
        }
        match &row.prev_hash {
            Some(p) if p.as_slice() == want => {}
            _ if rank == 1 => {
                return Err(broken("the first prev_hash is not 32 zero bytes".into()))
            }
            _ => {
                return Err(broken(format!(
                    "prev_hash is not the hash of event {}",
                    rank - 1
                )))
            }
        }
        want = Sha256::digest(canonical_bytes(row).map_err(broken)?).into();
    }
    Ok(rows.len())
}

/// What the check reports: `linked (N events)` or `broken at event K of N: why`.
pub fn state(rows: &[Row]) -> String {
    match verify(rows) {
        Ok(n) => format!("linked ({n} events)"),
        Err(b) => format!("broken at event {} of {}: {}", b.rank, rows.len(), b.why),
    }
}

/// Reads `schema.signed_events` in chain order.
pub async fn read(client: &tokio_postgres::Client, schema: &str) -> Result<Vec<Row>, String> {
    let table = format!("\"{}\".signed_events", schema.replace('"', "\"\""));
    let rows = client
        .query(&SELECT.replace("{table}", &table), &[])
        .await
        .map_err(|e| {
            format!(
                "reading {schema}.signed_events: {}",
                super::wait::error_chain(&e)
            )
        })?;
    rows.iter()
        .map(|r| {
            Ok(Row {
                id: r.try_get(0)?,
                agent_id: r.try_get(1)?,
                event_type: r.try_get(2)?,
                payload_hash: r.try_get(3)?,
                signature: r.try_get(4)?,
                attest_level: r.try_get(5)?,
                timestamp_us: r.try_get(6)?,
                prev_hash: r.try_get(7)?,
                sequence: r.try_get(8)?,
            })
        })
        .collect::<Result<_, tokio_postgres::Error>>()
        .map_err(|e| format!("reading {schema}.signed_events: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(sequence: i64, prev_hash: [u8; 32], timestamp_us: i64) -> Row {
        Row {
            id: format!("00000000-0000-4000-8000-00000000000{sequence}"),
            agent_id: "ai:peer".into(),
            event_type: "capture_turn".into(),
            payload_hash: vec![sequence as u8; 32],
            signature: (sequence % 2 == 0).then(|| vec![7; 64]),
            attest_level: "unsigned".into(),
            timestamp_us,
            prev_hash: Some(prev_hash.to_vec()),
            sequence: Some(sequence),
        }
    }

    fn chain(n: i64) -> Vec<Row> {
        let mut rows = Vec::new();
        let mut prev = [0u8; 32];
        for s in 1..=n {
            let r = row(s, prev, 1_780_000_000_000_000 + s * 1_000_123);
            prev = Sha256::digest(canonical_bytes(&r).unwrap()).into();
            rows.push(r);
        }
        rows
    }

    #[test]
    fn rfc3339_is_chronos_autosi() {
        // 2026-05-28T20:26:40Z and fractions of each width chrono prints.
        let s = 1_780_000_000_i64 * 1_000_000;
        assert_eq!(rfc3339(s).unwrap(), "2026-05-28T20:26:40+00:00");
        assert_eq!(rfc3339(s + 5_000).unwrap(), "2026-05-28T20:26:40.005+00:00");
        assert_eq!(
            rfc3339(s + 5_001).unwrap(),
            "2026-05-28T20:26:40.005001+00:00"
        );
        assert_eq!(
            rfc3339(s + 120_000).unwrap(),
            "2026-05-28T20:26:40.120+00:00"
        );
        assert_eq!(rfc3339(-1).unwrap(), "1969-12-31T23:59:59.999999+00:00");
    }

    #[test]
    fn each_kind_of_break_is_found_where_it_is() {
        assert_eq!(state(&[]), "linked (0 events)");
        assert_eq!(state(&chain(4)), "linked (4 events)");

        let mut altered = chain(4);
        altered[1].event_type = "capture_turn2".into();
        assert_eq!(
            state(&altered),
            "broken at event 3 of 4: prev_hash is not the hash of event 2"
        );
        let mut resigned = chain(4);
        resigned[1].signature = None;
        assert!(state(&resigned).starts_with("broken at event 3 of 4"));
        let mut retimed = chain(4);
        retimed[2].timestamp_us += 1;
        assert!(state(&retimed).starts_with("broken at event 4 of 4"));

        let mut genesis = chain(2);
        genesis[0].prev_hash = Some(vec![1; 32]);
        assert_eq!(
            state(&genesis),
            "broken at event 1 of 2: the first prev_hash is not 32 zero bytes"
        );
        let mut deleted = chain(4);
        deleted.remove(1);
        assert_eq!(
            state(&deleted),
            "broken at event 2 of 3: sequence 3 where 2 belongs"
        );
        let mut unmigrated = chain(2);
        unmigrated[0].sequence = None;
        assert_eq!(
            state(&unmigrated),
            "broken at event 1 of 2: sequence is NULL"
        );
        let mut no_prev = chain(2);
        no_prev[1].prev_hash = None;
        assert!(state(&no_prev).starts_with("broken at event 2 of 2: prev_hash"));
    }
}
