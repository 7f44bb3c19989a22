//! A real PostgreSQL server for a test: Debian's binaries, a fresh data directory in a
//! temporary folder, a free loopback port; stopped (immediately) when dropped. `initdb`
//! refuses root, so the server runs as a system user made for it (`txmq-pg`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The system user the test servers run as.
const USER: &str = "txmq-pg";

/// A running server.
pub struct Postgres {
    _temp: tempfile::TempDir,
    data: PathBuf,
    bin: PathBuf,
    port: u16,
}

/// The directory of Debian's PostgreSQL binaries (the newest installed).
fn bin_dir() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed (scripts/setup.sh installs it)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found.pop().expect("no initdb under /usr/lib/postgresql")
}

fn as_user(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", USER, "--"]).arg(bin.join(tool));
    c
}

fn ensure_user() {
    let known = Command::new("id")
        .args(["-u", USER])
        .output()
        .is_ok_and(|o| o.status.success());
    if !known {
        // Another test may make it at the same moment: then it exists either way.
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                USER,
            ])
            .status();
    }
}

fn owner_of(dir: &Path) {
    let uid = Command::new("id").args(["-u", USER]).output().expect("id");
    let uid: u32 = String::from_utf8_lossy(&uid.stdout)
        .trim()
        .parse()
        .expect("uid");
    std::os::unix::fs::chown(dir, Some(uid), None).expect("chown the data directory");
}

impl Postgres {
    /// Initializes and starts a server (about two seconds).
    pub fn start() -> Self {
        ensure_user();
        let bin = bin_dir();
        let temp = tempfile::tempdir().expect("temp dir");
        // The server's user must reach its directory inside the temporary one.
        std::fs::set_permissions(
            temp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let data = temp.path().join("data");
        std::fs::create_dir(&data).expect("data dir");
        owner_of(&data);
        let out = as_user(&bin, "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = crate::free_port();
        let log = data.join("server.log");
        let out = as_user(&bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1",
                data.display()
            ))
            .args(["-w", "-t", "60", "start"])
            .output()
            .expect("run pg_ctl start");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            _temp: temp,
            data,
            bin,
            port,
        }
    }

    /// The connection string (`tokio_postgres` key=value form).
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_user(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}
