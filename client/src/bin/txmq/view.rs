//! How the CLI prints: tables for people, one JSON object per line with `--json`.

use txmq_client::pb::{self, TxnState};

use serde_json::json;

/// One view printed as an aligned table with a header, or with `--json` as one JSON
/// object per row: every listing goes through it, so the two forms cannot drift apart.
pub struct View {
    json: bool,
    /// Column titles and widths; a negative width aligns left.
    columns: &'static [(&'static str, i32)],
}

impl View {
    pub fn new(json: bool, columns: &'static [(&'static str, i32)]) -> Self {
        let view = Self { json, columns };
        if !json {
            let titles: Vec<String> = columns.iter().map(|(t, _)| t.to_string()).collect();
            view.line(&titles);
        }
        view
    }

    fn line(&self, cells: &[String]) {
        let text: Vec<String> = cells
            .iter()
            .zip(self.columns)
            .map(|(cell, (_, width))| {
                let w = width.unsigned_abs() as usize;
                if *width < 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        println!("{}", text.join(" ").trim_end());
    }

    /// One row: `cells` for the table, `object` for `--json`.
    pub fn row(&mut self, cells: &[String], object: serde_json::Value) {
        if self.json {
            println!("{object}");
        } else {
            self.line(cells);
        }
    }
}

pub fn state_name(state: i32) -> &'static str {
    match TxnState::try_from(state) {
        Ok(TxnState::Prepared) => "prepared",
        Ok(TxnState::Committed) => "committed",
        Ok(TxnState::RolledBack) => "rolled_back",
        Ok(TxnState::Discarded) => "discarded",
        _ => "unknown",
    }
}

pub fn outcome_name(o: i32) -> &'static str {
    match pb::TxnOutcome::try_from(o) {
        Ok(pb::TxnOutcome::Commit) => "commit",
        Ok(pb::TxnOutcome::Rollback) => "rollback",
        Ok(pb::TxnOutcome::Unknown) => "unknown",
        _ => "",
    }
}

pub fn print_txn(t: &pb::TxnInfo, now_ms: u64, json: bool) {
    let age_s = now_ms.saturating_sub(t.created_ms) as f64 / 1000.0;
    if json {
        println!(
            "{}",
            json!({"id": t.txn_id, "group": t.producer_group, "state": state_name(t.state),
                "topics": t.topics, "messages": t.message_count, "age_s": age_s,
                "check_count": t.check_count, "last_check_result": outcome_name(t.last_check_result),
                "last_check_note": t.last_check_note, "next_check_ms": t.next_check_ms,
                "refused_ends": t.refused_ends, "refused_note": t.refused_note})
        );
    } else {
        let refused = if t.refused_ends > 0 {
            format!(" refused_ends={} ({})", t.refused_ends, t.refused_note)
        } else {
            String::new()
        };
        println!(
            "{} {:<10} group={} topics={} age={:.1}s checks={} last={} {}{refused}",
            t.txn_id,
            state_name(t.state),
            t.producer_group,
            t.topics.join(","),
            age_s,
            t.check_count,
            outcome_name(t.last_check_result),
            t.last_check_note
        );
    }
}
