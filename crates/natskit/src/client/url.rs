//! Server URLs: credentials in a URL's userinfo are taken out (async-nats
//! ignores them) and used as user/password or token. Pure.

use zeroize::Zeroizing;

use super::builder::Secrets;
use crate::core::error::{Error, Result};

/// Splits `scheme://userinfo@host...` into the URL without the userinfo and
/// the userinfo. Pure; never fails.
pub(crate) fn split_userinfo(url: &str) -> (String, Option<Zeroizing<String>>) {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = &url[start..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let userinfo = Zeroizing::new(rest[..at].to_owned());
            let clean = format!("{}{}", &url[..start], &rest[at + 1..]);
            (clean, Some(userinfo))
        }
        None => (url.to_owned(), None),
    }
}

/// `%XX` escapes decoded (a URL's userinfo may escape `:` `@` `/`).
pub(crate) fn percent_decode(text: &str) -> Zeroizing<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Zeroizing::new(String::from_utf8_lossy(&out).into_owned())
}

/// Uses credentials from the URLs as user/password (`user:pass@`) or token
/// (`token@`) when none were set on the builder.
pub(crate) fn apply_url_credentials(secrets: &mut Secrets) -> Result<()> {
    let Some(first) = secrets.url_userinfo.first() else {
        return Ok(());
    };
    if secrets.url_userinfo.iter().any(|u| **u != **first) {
        return Err(Error::InvalidConfig(
            "the server URLs carry different credentials; give them once with \
             user_password() or token()"
                .into(),
        ));
    }
    if secrets.user.is_some() || secrets.token.is_some() {
        return Ok(()); // explicit credentials win
    }
    match first.split_once(':') {
        Some((user, password)) => {
            secrets.user = Some(percent_decode(user));
            secrets.password = Some(percent_decode(password));
        }
        None => secrets.token = Some(percent_decode(first)),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::ClientBuilder;

    #[test]
    fn url_userinfo_is_taken_out() {
        let (clean, info) = split_userinfo("nats://alice:s3cret@host:4222/x");
        assert_eq!(clean, "nats://host:4222/x");
        assert_eq!(info.as_deref().map(String::as_str), Some("alice:s3cret"));
        let (clean, info) = split_userinfo("tls://tok@host");
        assert_eq!((clean.as_str(), info.is_some()), ("tls://host", true));
        let (clean, info) = split_userinfo("host:4222");
        assert_eq!((clean.as_str(), info.is_none()), ("host:4222", true));
        // An '@' after the authority is not userinfo.
        let (clean, info) = split_userinfo("nats://host/a@b");
        assert_eq!((clean.as_str(), info.is_none()), ("nats://host/a@b", true));
    }

    #[test]
    fn url_credentials_become_user_password_or_token() {
        let builder = ClientBuilder::new("nats://al%40ice:p%3Ass@a:1, nats://al%40ice:p%3Ass@b:2");
        let mut secrets = builder.secrets.clone();
        apply_url_credentials(&mut secrets).expect("same credentials");
        assert_eq!(secrets.user.as_deref().map(String::as_str), Some("al@ice"));
        assert_eq!(
            secrets.password.as_deref().map(String::as_str),
            Some("p:ss")
        );
        assert_eq!(builder.config.urls, vec!["nats://a:1", "nats://b:2"]);
        let debug = format!("{builder:?}");
        assert!(
            !debug.contains("p%3Ass") && !debug.contains("ice"),
            "{debug}"
        );

        let mut token = ClientBuilder::new("nats://t0ken@a:1").secrets;
        apply_url_credentials(&mut token).expect("a token");
        assert_eq!(token.token.as_deref().map(String::as_str), Some("t0ken"));

        let mut mixed = ClientBuilder::new("nats://u:p@a:1,nats://v:q@b:2").secrets;
        let err = apply_url_credentials(&mut mixed).expect_err("different credentials");
        let text = err.to_string();
        assert!(!text.contains("u:p") && !text.contains("v:q"), "{text}");
    }
}
