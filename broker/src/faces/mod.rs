//! The faces of the broker: each translates one wire protocol into calls of the
//! [`crate::service`] and their outcomes back into its own answers.
//!
//! - [`native`]: txmq's framed, checksummed protocol (`txmq`, the Rust client).
//! - [`grpc`]: RocketMQ 5's gRPC protocol (the official RocketMQ 5 clients).
//! - [`remoting`]: RocketMQ's Remoting protocol (the classic Java and Go clients,
//!   Spring Boot, mqadmin).

pub mod grpc;
pub mod native;
mod poll;
pub mod remoting;
mod renew;

#[cfg(test)]
mod layering {
    //! Issue 26, "one door": the faces translate and the service decides. A face that
    //! reached past the service into storage, the writer or the groups' queues would
    //! make a rule written once in the service missing on that face.

    use std::path::Path;

    /// The code of every file under `dir` (comments dropped), by path.
    fn sources(dir: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).expect("read source dir") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                out.extend(sources(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read source");
                // Tests may build what they check from the parts behind the service.
                let text = text.split("#[cfg(test)]").next().unwrap_or_default();
                let code = text
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect::<Vec<_>>()
                    .join("\n");
                out.push((path.display().to_string(), code));
            }
        }
        out
    }

    fn src(dir: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join(dir)
    }

    #[test]
    fn faces_reach_nothing_behind_the_service() {
        let forbidden = [
            "storage::",
            "delivery::",
            "QueueMsg",
            "ConsumerSpec",
            "blocking(",
            ".submit(",
            "shared.writer",
            "shared.storage",
            "shared.groups",
            "shared.producers",
            "shared.answers",
            "shared.topics",
            "txn::checker",
            "txn::producers",
        ];
        let files = sources(&src("faces"));
        assert!(files.len() >= 10, "the faces' sources were not found");
        for (path, code) in files {
            for name in forbidden {
                assert!(
                    !code.contains(name),
                    "{path} names {name}: a face calls the service instead"
                );
            }
        }
    }

    #[test]
    fn the_service_names_no_face() {
        let files = sources(&src("service"));
        assert!(files.len() >= 8, "the service's sources were not found");
        for (path, code) in files {
            for name in ["faces::", "tonic", "Body::", "frame.id"] {
                assert!(
                    !code.contains(name),
                    "{path} names {name}: the service is face-neutral"
                );
            }
        }
    }
}
