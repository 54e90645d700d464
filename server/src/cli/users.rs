//! `herald-server users ...`: console accounts, managed locally against the store
//! (like `init`): add one (password from stdin), list them, change a role. The first
//! account is not an admin by itself; admins are made here.

use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::console::auth;
use crate::model::{Role, User};
use crate::store::{Store, StoreError};

/// `users ...`.
#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create an account; reads the password (one line) from standard input.
    Add {
        /// Login: 3 to 32 characters of a-z, 0-9, '.', '_', '-'.
        login: String,
        /// Make the account an admin.
        #[arg(long)]
        admin: bool,
    },
    /// List accounts.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Change an account's role.
    SetRole {
        /// Login.
        login: String,
        /// `admin` or `user`.
        role: Role,
    },
}

impl clap::ValueEnum for Role {
    fn value_variants<'a>() -> &'a [Self] {
        &[Role::Admin, Role::User]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.as_str()))
    }
}

/// Why a `users` command failed.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    /// Bad input (login, password).
    #[error("{0}")]
    Usage(String),
    /// The database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The password could not be read or hashed.
    #[error("{0}")]
    Password(String),
}

/// Runs a `users` command against the store in `data_dir`; the password of `add`
/// comes from `input`.
pub fn run(
    data_dir: &Path,
    command: UsersCommand,
    input: &mut dyn BufRead,
) -> Result<ExitCode, UsersError> {
    if !crate::config::server_config_path(data_dir).exists() {
        return Err(UsersError::Usage(format!(
            "no server in {} (run `herald-server init` first, or pass --data-dir)",
            data_dir.display()
        )));
    }
    let store = crate::serve::open_store(data_dir).map_err(|e| UsersError::Usage(e.to_string()))?;
    match command {
        UsersCommand::Add { login, admin } => {
            auth::check_login(&login).map_err(UsersError::Usage)?;
            let password = read_password(input)?;
            auth::check_new_password(&password, &password).map_err(UsersError::Usage)?;
            let hash =
                auth::hash_password(&password).map_err(|e| UsersError::Password(e.to_string()))?;
            let role = if admin { Role::Admin } else { Role::User };
            let id = store.add_user(&login, &hash, role, "", "", crate::now_ms())?;
            audit_locally(&store, "users.add", &login, &format!("ok: {role}"))?;
            println!("added {role} {login} (id {id})");
        }
        UsersCommand::List { json } => {
            let users = store.users()?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&users).unwrap_or_else(|_| "[]".into())
                );
            } else {
                print_users(&users);
            }
        }
        UsersCommand::SetRole { login, role } => {
            let user = store
                .user_by_login(&login)?
                .ok_or_else(|| UsersError::Usage(format!("no user {login}")))?;
            store.set_role(user.id, role)?;
            audit_locally(&store, "users.set_role", &login, &format!("ok: {role}"))?;
            println!("{login} is now {role}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Records a change made on the server's own machine, by the operating-system user
/// who ran the command.
fn audit_locally(
    store: &Store,
    action: &str,
    target: &str,
    outcome: &str,
) -> Result<(), UsersError> {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| "unknown".into());
    let event = crate::model::AuditEvent {
        actor: format!("local:{user}"),
        source: "local".into(),
        action: action.into(),
        target: target.into(),
        outcome: outcome.into(),
    };
    store.audit(&event, crate::now_ms())?;
    Ok(())
}

/// One line from `input`, without its line ending.
fn read_password(input: &mut dyn BufRead) -> Result<String, UsersError> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .map_err(|e| UsersError::Password(format!("cannot read the password from stdin: {e}")))?;
    let password = line.trim_end_matches(['\n', '\r']).to_string();
    if password.is_empty() {
        return Err(UsersError::Usage(
            "give the password on standard input, e.g. `echo \"$PASSWORD\" | herald-server users add LOGIN`"
                .into(),
        ));
    }
    Ok(password)
}

fn print_users(users: &[User]) {
    println!(
        "{:<6} {:<32} {:<6} {:<24} EMAIL",
        "ID", "LOGIN", "ROLE", "CREATED"
    );
    for u in users {
        println!(
            "{:<6} {:<32} {:<6} {:<24} {}",
            u.id,
            u.login,
            u.role,
            herald_shared::schedule::format_time(u.created_at),
            u.email
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "herald-users-{}",
            hex::encode(crate::random_bytes::<6>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(crate::config::SERVER_CONFIG), "").unwrap();
        dir
    }

    #[test]
    fn add_reads_one_line_and_set_role_promotes() {
        let dir = data_dir();
        let add = UsersCommand::Add {
            login: "root.admin".into(),
            admin: true,
        };
        run(&dir, add, &mut &b"a long password\nignored\n"[..]).unwrap();
        let add = UsersCommand::Add {
            login: "plain".into(),
            admin: false,
        };
        run(&dir, add, &mut &b"another password\r\n"[..]).unwrap();
        let store = Store::open(&dir).unwrap();
        let admin = store.user_by_login("root.admin").unwrap().unwrap();
        assert_eq!(admin.role, Role::Admin);
        let hash = store.password_hash(admin.id).unwrap();
        assert!(auth::verify_password("a long password", &hash));
        let plain = store.user_by_login("plain").unwrap().unwrap();
        assert_eq!(plain.role, Role::User);
        assert!(auth::verify_password(
            "another password",
            &store.password_hash(plain.id).unwrap()
        ));
        let promote = UsersCommand::SetRole {
            login: "plain".into(),
            role: Role::Admin,
        };
        run(&dir, promote, &mut &b""[..]).unwrap();
        assert!(store.user_by_login("plain").unwrap().unwrap().is_admin());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_logins_short_passwords_and_duplicates_are_refused() {
        let dir = data_dir();
        let add = |login: &str| UsersCommand::Add {
            login: login.into(),
            admin: false,
        };
        assert!(matches!(
            run(&dir, add("Bad Login"), &mut &b"a long password\n"[..]),
            Err(UsersError::Usage(_))
        ));
        assert!(matches!(
            run(&dir, add("ann"), &mut &b"short\n"[..]),
            Err(UsersError::Usage(_))
        ));
        assert!(matches!(
            run(&dir, add("ann"), &mut &b""[..]),
            Err(UsersError::Usage(_))
        ));
        run(&dir, add("ann"), &mut &b"a long password\n"[..]).unwrap();
        assert!(matches!(
            run(&dir, add("ann"), &mut &b"a long password\n"[..]),
            Err(UsersError::Store(StoreError::Conflict(_)))
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
