//! The daemon's settings from a TOML file and `WARREN_*` environment
//! variables, over its command-line flags: every flag `--some-flag` is also
//! the file's key `some-flag` (or `some_flag`) and the variable
//! `WARREN_SOME_FLAG`. Precedence: flags, then the environment, then the
//! file, then the built-in defaults. A key the daemon does not know is an
//! error that names the key and the file.

use clap::Command;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variable for a flag's id (`memory_limit` →
/// `WARREN_MEMORY_LIMIT`).
pub fn env_name(id: &str) -> String {
    format!("WARREN_{}", id.to_uppercase().replace('-', "_"))
}

/// Give every long flag of `cmd` its `WARREN_*` variable.
pub fn with_env(mut cmd: Command) -> Command {
    let ids: Vec<String> = cmd
        .get_arguments()
        .filter(|a| a.get_long().is_some() && a.get_id() != "help" && a.get_id() != "version")
        .map(|a| a.get_id().to_string())
        .collect();
    for id in ids {
        let var = env_name(&id);
        cmd = cmd.mut_arg(id, |a| a.env(var));
    }
    cmd
}

/// The `--config FILE` (or `WARREN_CONFIG`) among the raw arguments, found
/// before the arguments are parsed (the file sets their defaults).
pub fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix("--config=") {
            return Some(PathBuf::from(v));
        }
        if s == "--" {
            break;
        }
    }
    std::env::var_os("WARREN_CONFIG").map(PathBuf::from)
}

/// Read `path` and make its settings the defaults of `cmd`'s flags.
pub fn apply_file(mut cmd: Command, path: &Path) -> Result<Command, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    for (key, value) in table {
        let id = key.replace('-', "_");
        let known = cmd.get_arguments().any(|a| {
            a.get_id() == id.as_str() && a.get_long().is_some() && id != "config" && id != "help"
        });
        if !known {
            return Err(format!(
                "config file {}: unknown key '{key}'",
                path.display()
            ));
        }
        let v = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(items) => {
                let mut parts = Vec::new();
                for i in items {
                    match i {
                        toml::Value::String(s) => parts.push(s),
                        other => {
                            return Err(format!(
                                "config file {}: '{key}' must list strings, not {}",
                                path.display(),
                                other.type_str()
                            ))
                        }
                    }
                }
                parts.join(",")
            }
            other => {
                return Err(format!(
                    "config file {}: '{key}' cannot be {}",
                    path.display(),
                    other.type_str()
                ))
            }
        };
        cmd = cmd.mut_arg(id, |a| a.default_value(v));
    }
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn cmd() -> Command {
        Command::new("t")
            .arg(Arg::new("port").long("port").default_value("5672"))
            .arg(
                Arg::new("memory_limit")
                    .long("memory-limit")
                    .default_value("0.4"),
            )
            .arg(
                Arg::new("fsync")
                    .long("fsync")
                    .action(ArgAction::Set)
                    .default_value("true"),
            )
            .arg(
                Arg::new("loopback_users")
                    .long("loopback-users")
                    .default_value("guest"),
            )
            .arg(Arg::new("config").long("config"))
    }

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("w.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn flags_over_environment_over_file_over_defaults() {
        let (_d, p) = file("port = 6000\nmemory-limit = \"1GiB\"\nfsync = false\nloopback_users = [\"a\", \"b\"]\n");
        let c = with_env(apply_file(cmd(), &p).unwrap());
        let m = c.clone().get_matches_from(["t"]);
        assert_eq!(m.get_one::<String>("port").unwrap(), "6000");
        assert_eq!(m.get_one::<String>("memory_limit").unwrap(), "1GiB");
        assert_eq!(m.get_one::<String>("fsync").unwrap(), "false");
        assert_eq!(m.get_one::<String>("loopback_users").unwrap(), "a,b");
        let m = c.clone().get_matches_from(["t", "--port", "7000"]);
        assert_eq!(m.get_one::<String>("port").unwrap(), "7000");
        // The environment (clap reads a variable when the flag is given
        // one; this one only this test uses).
        std::env::set_var("WARREN_TEST_CONFIG_FILE_PORT", "8000");
        let c = apply_file(cmd(), &p)
            .unwrap()
            .mut_arg("port", |a| a.env("WARREN_TEST_CONFIG_FILE_PORT"));
        let m = c.clone().get_matches_from(["t"]);
        assert_eq!(m.get_one::<String>("port").unwrap(), "8000");
        let m = c.get_matches_from(["t", "--port", "9000"]);
        assert_eq!(m.get_one::<String>("port").unwrap(), "9000");
        std::env::remove_var("WARREN_TEST_CONFIG_FILE_PORT");
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key_and_file() {
        let (_d, p) = file("prot = 1\n");
        let e = apply_file(cmd(), &p).unwrap_err();
        assert!(
            e.contains("unknown key 'prot'") && e.contains("w.toml"),
            "{e}"
        );
        let (_d, p) = file("config = \"x\"\n");
        assert!(apply_file(cmd(), &p)
            .unwrap_err()
            .contains("unknown key 'config'"));
        let (_d, p) = file("port = [1]\n");
        assert!(apply_file(cmd(), &p)
            .unwrap_err()
            .contains("'port' must list strings"));
        let (_d, p) = file("port = \n");
        assert!(apply_file(cmd(), &p).is_err());
        assert!(apply_file(cmd(), Path::new("/no/such/file.toml"))
            .unwrap_err()
            .contains("cannot read config file"));
    }

    #[test]
    fn finds_the_config_flag_before_parsing() {
        let a = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            config_path(&a(&["w", "--port", "1", "--config", "x.toml"])),
            Some(PathBuf::from("x.toml"))
        );
        assert_eq!(
            config_path(&a(&["w", "--config=y.toml"])),
            Some(PathBuf::from("y.toml"))
        );
        assert_eq!(
            config_path(&a(&["w", "--", "--config", "z"])),
            std::env::var_os("WARREN_CONFIG").map(PathBuf::from)
        );
        assert_eq!(env_name("memory_limit"), "WARREN_MEMORY_LIMIT");
    }
}
