//! How a Flotilla process authenticates to NATS: one type, one precedence.

use std::fmt;
use std::path::PathBuf;

/// One way to authenticate. When several are configured, [`Auth::pick`]
/// applies the precedence credentials file > nkey seed file > user/password
/// > none, the same in agent, control plane and CLI.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Auth {
    /// No authentication.
    #[default]
    None,
    /// A `.creds` file: user JWT + nkey seed (decentralised auth).
    CredentialsFile(PathBuf),
    /// A file holding an nkey user seed (`SU…`), for servers configured with
    /// `nkey` users. Read at connect time; the seed never appears in argv.
    NkeySeedFile(PathBuf),
    /// User and password.
    UserPassword { user: String, password: String },
}

impl fmt::Debug for Auth {
    /// Never prints the password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::CredentialsFile(p) => f.debug_tuple("CredentialsFile").field(p).finish(),
            Self::NkeySeedFile(p) => f.debug_tuple("NkeySeedFile").field(p).finish(),
            Self::UserPassword { user, .. } => f
                .debug_struct("UserPassword")
                .field("user", user)
                .field("password", &"<redacted>")
                .finish(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a NATS password was given without a user")]
    PasswordWithoutUser,
    #[error("NATS user {user:?} was given without a password")]
    UserWithoutPassword { user: String },
}

impl Auth {
    /// Picks one method from whatever the caller's configuration holds, by
    /// the documented precedence. A user without a password (or the reverse)
    /// is an error unless a method of higher precedence is given, in which
    /// case the user/password pair is not used at all.
    ///
    /// # Errors
    /// [`AuthError`] when user/password would be used but only one half of
    /// the pair is given.
    pub fn pick(
        credentials_file: Option<PathBuf>,
        nkey_seed_file: Option<PathBuf>,
        user: Option<String>,
        password: Option<String>,
    ) -> Result<Self, AuthError> {
        if let Some(path) = credentials_file {
            return Ok(Self::CredentialsFile(path));
        }
        if let Some(path) = nkey_seed_file {
            return Ok(Self::NkeySeedFile(path));
        }
        match (user, password) {
            (Some(user), Some(password)) => Ok(Self::UserPassword { user, password }),
            (Some(user), None) => Err(AuthError::UserWithoutPassword { user }),
            (None, Some(_)) => Err(AuthError::PasswordWithoutUser),
            (None, None) => Ok(Self::None),
        }
    }

    /// A short name for logs: `none`, `creds`, `nkey`, `user`.
    pub fn method(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::CredentialsFile(_) => "creds",
            Self::NkeySeedFile(_) => "nkey",
            Self::UserPassword { .. } => "user",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_creds_then_nkey_then_user_password_then_none() {
        let creds = || Some(PathBuf::from("/c.creds"));
        let nkey = || Some(PathBuf::from("/seed.nk"));
        let user = || Some("u".to_owned());
        let pass = || Some("p".to_owned());
        let rows = [
            (
                Auth::pick(creds(), nkey(), user(), pass()),
                Ok(Auth::CredentialsFile("/c.creds".into())),
            ),
            (
                Auth::pick(None, nkey(), user(), pass()),
                Ok(Auth::NkeySeedFile("/seed.nk".into())),
            ),
            (
                Auth::pick(None, None, user(), pass()),
                Ok(Auth::UserPassword {
                    user: "u".into(),
                    password: "p".into(),
                }),
            ),
            (Auth::pick(None, None, None, None), Ok(Auth::None)),
            // A half pair is only an error when it would be used.
            (
                Auth::pick(creds(), None, user(), None),
                Ok(Auth::CredentialsFile("/c.creds".into())),
            ),
            (
                Auth::pick(None, None, user(), None),
                Err(AuthError::UserWithoutPassword { user: "u".into() }),
            ),
            (
                Auth::pick(None, None, None, pass()),
                Err(AuthError::PasswordWithoutUser),
            ),
        ];
        for (i, (got, want)) in rows.into_iter().enumerate() {
            assert_eq!(got, want, "row {i}");
        }
    }

    #[test]
    fn debug_never_shows_the_password() {
        let a = Auth::UserPassword {
            user: "pi".into(),
            password: "hunter2".into(),
        };
        let shown = format!("{a:?}");
        assert!(
            shown.contains("pi") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
