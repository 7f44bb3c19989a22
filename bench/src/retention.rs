//! `retention`: whether a broker under steady load with a short retention keeps its disk
//! use bounded (issue 15's "done when").
//!
//! The bench starts its own broker with `--retention <--retention-secs>` and a retention
//! sweep every fifth of that, then sends `--messages` paced at `--rate` a second (20,000
//! when 0) while it samples the disk use of the broker's data directory every second.
//! Written grows with the load; kept should level off at about what one retention holds
//! (plus RocksDB's files waiting for compaction): the report gives both, and the samples.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::{Args, Report};

/// Bytes the files under `path` take on disk (allocated blocks, as `du` counts).
fn du(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if meta.is_dir() {
        std::fs::read_dir(path)
            .map(|d| d.flatten().map(|e| du(&e.path())).sum())
            .unwrap_or(0)
    } else {
        meta.blocks() * 512
    }
}

/// Broker flags of this scenario.
pub fn broker_args(args: &Args) -> Vec<String> {
    let keep = args.retention_secs.max(1);
    vec![
        "--retention".into(),
        format!("{keep}s"),
        "--retention-interval".into(),
        format!("{}ms", (keep * 1000 / 5).max(200)),
    ]
}

pub async fn retention(
    args: &Args,
    addr: &str,
    data_dir: Option<PathBuf>,
) -> anyhow::Result<Report> {
    let Some(dir) = data_dir else {
        anyhow::bail!("retention needs a broker the bench starts (it measures its data directory)");
    };
    let mut args = args.clone();
    if args.rate == 0 {
        args.rate = 20_000;
    }
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, dir) = (done.clone(), dir.clone());
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                samples.push((started.elapsed().as_secs(), du(&dir)));
                std::thread::sleep(Duration::from_secs(1));
            }
            samples.push((started.elapsed().as_secs(), du(&dir)));
            samples
        })
    };
    let sent = crate::scenarios::send(&args, addr, "bench-retention", false, 0).await;
    done.store(true, Ordering::Relaxed);
    let samples = sampler.await?;
    let mut report = sent?;
    let mb = |b: u64| (b as f64 / (1 << 20) as f64 * 10.0).round() / 10.0;
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    // The second half of the run: after the first retention period, what is kept should
    // stay level while what was written keeps growing.
    let late = &samples[samples.len() / 2..];
    let late_max = late.iter().map(|s| s.1).max().unwrap_or(0);
    let late_min = late.iter().map(|s| s.1).min().unwrap_or(0);
    let written = report.done * args.size as u64;
    let e = &mut report.extra;
    e.insert("retention_secs".into(), args.retention_secs.into());
    e.insert("written_mib".into(), mb(written).into());
    e.insert("disk_peak_mib".into(), mb(peak).into());
    e.insert(
        "disk_second_half_mib".into(),
        format!("{}..{}", mb(late_min), mb(late_max)).into(),
    );
    e.insert(
        "disk_last_mib".into(),
        mb(samples.last().map_or(0, |s| s.1)).into(),
    );
    let every = (samples.len() / 20).max(1);
    let series: Vec<String> = samples
        .iter()
        .step_by(every)
        .map(|(t, b)| format!("{t}s:{}", mb(*b)))
        .collect();
    e.insert("disk_mib_samples".into(), series.join(" ").into());
    Ok(report)
}
