//! Decentralised (JWT) authentication for test servers: an operator, one
//! account and users, signed in-process with fresh nkeys.

use std::fmt::{self, Write as _};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde_json::{Value, json};

use crate::HarnessError;

/// An operator and one account for a server in operator mode, from which
/// user credentials (`.creds` files) are issued.
///
/// The server trusts the operator and has the account JWTs preloaded (a
/// memory resolver), so no account server is needed. The account has
/// JetStream enabled without limits; a system account is configured too,
/// as JetStream requires in operator mode.
///
/// ```no_run
/// # fn main() -> Result<(), natskit_testing::HarnessError> {
/// use natskit_testing::{NatsServer, OperatorAuth};
///
/// let auth = OperatorAuth::generate()?;
/// let server = NatsServer::builder().operator(&auth).start()?;
/// let creds = server.dir().join("app.creds");
/// auth.write_user_creds("app", &creds)?;
/// // natskit::Client::builder(server.url()).credentials_file(&creds) ...
/// # Ok(()) }
/// ```
pub struct OperatorAuth {
    operator_jwt: String,
    account: KeyPair,
    account_jwt: String,
    /// The system account (JetStream needs one in operator mode).
    system_public: String,
    system_jwt: String,
}

impl fmt::Debug for OperatorAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OperatorAuth")
            .field("account", &self.account.public_key())
            .finish_non_exhaustive()
    }
}

impl OperatorAuth {
    /// Generates an operator, and an account and a system account signed by it.
    ///
    /// # Errors
    /// Signing failed.
    pub fn generate() -> Result<Self, HarnessError> {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        let operator_jwt = sign_jwt(
            &operator,
            &operator.public_key(),
            "natskit-test-operator",
            json!({ "type": "operator", "version": 2 }),
        )?;
        let account_jwt = sign_jwt(
            &operator,
            &account.public_key(),
            "natskit-test-account",
            json!({
                "type": "account",
                "version": 2,
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1,
                    "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
                    "mem_storage": -1, "disk_storage": -1, "streams": -1,
                    "consumer": -1
                },
                "default_permissions": { "pub": {}, "sub": {} }
            }),
        )?;
        let system = KeyPair::new_account();
        let system_jwt = sign_jwt(
            &operator,
            &system.public_key(),
            "SYS",
            json!({ "type": "account", "version": 2 }),
        )?;
        Ok(Self {
            operator_jwt,
            account,
            account_jwt,
            system_public: system.public_key(),
            system_jwt,
        })
    }

    /// The account's public key.
    pub fn account_public_key(&self) -> String {
        self.account.public_key()
    }

    /// The contents of a `.creds` file for a new user of the account (user
    /// JWT plus the user's nkey seed).
    ///
    /// # Errors
    /// Signing failed.
    pub fn user_creds(&self, name: &str) -> Result<String, HarnessError> {
        let user = KeyPair::new_user();
        let jwt = sign_jwt(
            &self.account,
            &user.public_key(),
            name,
            json!({
                "type": "user",
                "version": 2,
                "pub": {}, "sub": {},
                "subs": -1, "data": -1, "payload": -1
            }),
        )?;
        let seed = user
            .seed()
            .map_err(|e| HarnessError::Client(e.to_string()))?;
        Ok(format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
        ))
    }

    /// Writes [`user_creds`](Self::user_creds) to `path`.
    ///
    /// # Errors
    /// Signing or writing failed.
    pub fn write_user_creds(&self, name: &str, path: &Path) -> Result<(), HarnessError> {
        std::fs::write(path, self.user_creds(name)?)
            .map_err(|e| HarnessError::io("writing a credentials file", e))
    }

    /// The server configuration for operator mode.
    pub(crate) fn config_text(&self) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "operator: {}",
            Value::from(self.operator_jwt.as_str())
        );
        let _ = writeln!(text, "resolver: MEMORY");
        let _ = writeln!(text, "system_account: {}", self.system_public);
        let _ = writeln!(
            text,
            "resolver_preload: {{ {}: {}, {}: {} }}",
            self.account.public_key(),
            Value::from(self.account_jwt.as_str()),
            self.system_public,
            Value::from(self.system_jwt.as_str())
        );
        text
    }
}

/// A NATS v2 JWT: `header.claims.signature`, base64url without padding,
/// signed with ed25519 by `issuer` over `header.claims`.
fn sign_jwt(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    nats: Value,
) -> Result<String, HarnessError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = json!({ "typ": "JWT", "alg": "ed25519-nkey" });
    let claims = json!({
        "jti": format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..)),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| HarnessError::Client(format!("signing a JWT: {e}")))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwts_verify_with_the_issuer_key() -> Result<(), HarnessError> {
        let auth = OperatorAuth::generate()?;
        let creds = auth.user_creds("u")?;
        let jwt = creds.lines().nth(1).unwrap_or_default();
        let (input, signature) = jwt.rsplit_once('.').unwrap_or_default();
        let signature = URL_SAFE_NO_PAD.decode(signature).unwrap_or_default();
        assert!(auth.account.verify(input.as_bytes(), &signature).is_ok());
        let (_, claims) = input.split_once('.').unwrap_or_default();
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap_or_default())
                .unwrap_or_default();
        assert_eq!(claims["iss"], Value::from(auth.account_public_key()));
        assert_eq!(claims["nats"]["type"], "user");
        let seed = auth.account.seed().unwrap_or_default();
        assert!(!seed.is_empty() && !format!("{auth:?}").contains(&seed));
        Ok(())
    }
}
