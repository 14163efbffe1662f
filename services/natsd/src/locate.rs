//! Finding a nats-server binary of the pinned version.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::NatsdError;

/// The one nats-server release Herald runs on; `scripts/install-nats-server.sh` installs it.
pub const PINNED_VERSION: &str = "2.14.6";

/// Finds a nats-server binary that reports [`PINNED_VERSION`], looking at the process
/// environment. See [`locate_with`] for the search order.
///
/// # Errors
///
/// [`NatsdError::NotFound`] when no candidate has the pinned version; it lists every
/// candidate tried and tells the operator to run `scripts/install-nats-server.sh`.
pub fn locate() -> Result<PathBuf, NatsdError> {
    locate_with(&|key| std::env::var_os(key))
}

/// Finds a nats-server binary that reports [`PINNED_VERSION`], reading variables through
/// `env` (so tests need not touch the process environment).
///
/// Candidates, in order: `HERALD_NATS_SERVER`; `$HERALD_HOME/bin/nats-server` with
/// `HERALD_HOME` defaulting to `$HOME/.local/share/herald`; `nats-server` in each `PATH`
/// directory. A candidate is accepted only if `<candidate> --version` prints
/// `nats-server: v<PINNED_VERSION>`; a wrong version is skipped, not fatal.
///
/// # Errors
///
/// [`NatsdError::NotFound`] when no candidate has the pinned version.
pub fn locate_with(env: &dyn Fn(&str) -> Option<OsString>) -> Result<PathBuf, NatsdError> {
    let mut tried = Vec::new();
    for (origin, candidate) in candidates(env) {
        match check_version(&candidate) {
            Ok(()) => return Ok(candidate),
            Err(why) => tried.push(format!("{origin} {}: {why}", candidate.display())),
        }
    }
    if tried.is_empty() {
        tried.push("HERALD_NATS_SERVER unset, no HERALD_HOME or HOME, empty PATH".to_owned());
    }
    Err(NatsdError::NotFound {
        tried: tried.join("; "),
    })
}

/// Every candidate path with where it came from, in search order. PATH entries that
/// have no `nats-server` are left out so the error stays readable.
fn candidates(env: &dyn Fn(&str) -> Option<OsString>) -> Vec<(&'static str, PathBuf)> {
    let mut out = Vec::new();
    if let Some(explicit) = env("HERALD_NATS_SERVER").filter(|v| !v.is_empty()) {
        out.push(("HERALD_NATS_SERVER", PathBuf::from(explicit)));
    }
    let home = env("HERALD_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            env("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| Path::new(&h).join(".local/share/herald"))
        });
    if let Some(home) = home {
        out.push(("HERALD_HOME", home.join("bin").join("nats-server")));
    }
    if let Some(path) = env("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                out.push(("PATH", candidate));
            }
        }
    }
    out
}

/// Runs `binary --version` and checks it names exactly [`PINNED_VERSION`].
fn check_version(binary: &Path) -> Result<(), String> {
    if !binary.is_file() {
        return Err("no such file".to_owned());
    }
    let output = Command::new(binary)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run it ({e})"))?;
    let printed = String::from_utf8_lossy(&output.stdout);
    let printed = printed.trim();
    if output.status.success() && printed == format!("nats-server: v{PINNED_VERSION}") {
        Ok(())
    } else if printed.is_empty() {
        Err(format!("`--version` printed nothing ({})", output.status))
    } else {
        let first_line: String = printed
            .lines()
            .next()
            .unwrap_or_default()
            .chars()
            .take(80)
            .collect();
        Err(format!("`--version` says `{first_line}`"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_from(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let pairs: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |key| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    }

    #[test]
    fn nothing_found_names_the_install_script_and_each_candidate() {
        let home = tempfile::tempdir().expect("tempdir");
        let home_str = home.path().to_str().expect("utf-8 temp path");
        let env = env_from(&[
            ("HERALD_NATS_SERVER", "/bin/true"),
            ("HERALD_HOME", home_str),
            ("PATH", ""),
        ]);
        let err = locate_with(&env).expect_err("nothing valid to find");
        let text = err.to_string();
        assert!(text.contains("scripts/install-nats-server.sh"), "{text}");
        assert!(text.contains("HERALD_NATS_SERVER /bin/true"), "{text}");
        assert!(
            text.contains(&format!("{home_str}/bin/nats-server: no such file")),
            "{text}"
        );
    }

    #[test]
    fn wrong_version_is_skipped_for_the_next_candidate() {
        let real = locate().expect("the pinned nats-server is installed");
        let home = tempfile::tempdir().expect("tempdir");
        // The installed file is named nats-server-<version>; PATH lookup wants `nats-server`.
        let bin = home.path().join("path");
        std::fs::create_dir(&bin).expect("mkdir");
        std::os::unix::fs::symlink(&real, bin.join("nats-server")).expect("symlink");
        let env = env_from(&[
            ("HERALD_NATS_SERVER", "/bin/true"),
            ("HERALD_HOME", home.path().to_str().expect("utf-8")),
            ("PATH", bin.to_str().expect("utf-8")),
        ]);
        let found = locate_with(&env).expect("the PATH candidate has the pinned version");
        assert_eq!(found, bin.join("nats-server"));
    }
}
