//! The one rule for topic and group names, shared by broker (which enforces it) and
//! client (which reports it early).

/// Longest accepted topic or group name, in bytes.
pub const MAX_NAME_LEN: usize = 128;

/// Checks a topic or group name: 1 to [`MAX_NAME_LEN`] characters from `[A-Za-z0-9._-]`.
///
/// # Errors
/// A sentence saying what is wrong with the name, fit to show a user.
pub fn validate(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!(
            "{kind} name is {} bytes long; the limit is {MAX_NAME_LEN}",
            name.len()
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{kind} name {name:?} has the character {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names_and_refuses_the_rest() {
        assert!(validate("topic", "orders.v1_eu-west").is_ok());
        assert!(validate("topic", "").is_err());
        assert!(validate("topic", "a b").is_err());
        assert!(validate("topic", "%DLQ%g").is_err());
        assert!(validate("topic", "ü").is_err());
        assert!(validate("topic", &"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(validate("topic", &"a".repeat(MAX_NAME_LEN + 1)).is_err());
    }
}
