use std::collections::BTreeMap;
use std::sync::Mutex;

use super::*;

/// Users and rules in a map, as the writer would store them.
#[derive(Default)]
struct Map {
    users: Mutex<BTreeMap<String, UserRecord>>,
    rules: Mutex<BTreeMap<u64, RuleRecord>>,
}

impl Store for Map {
    async fn put_user(&self, name: &str, record: &UserRecord) -> Result<()> {
        self.users
            .lock()
            .unwrap()
            .insert(name.into(), record.clone());
        Ok(())
    }
    async fn delete_user(&self, name: &str, rules: &[u64]) -> Result<()> {
        self.users.lock().unwrap().remove(name);
        let mut stored = self.rules.lock().unwrap();
        for id in rules {
            stored.remove(id);
        }
        Ok(())
    }
    async fn put_rule(&self, id: u64, record: &RuleRecord) -> Result<()> {
        self.rules.lock().unwrap().insert(id, record.clone());
        Ok(())
    }
    async fn delete_rules(&self, ids: &[u64]) -> Result<()> {
        let mut stored = self.rules.lock().unwrap();
        for id in ids {
            stored.remove(id);
        }
        Ok(())
    }
}

fn rule(user: &str, resource: &str, actions: &[&str], deny: bool) -> RuleRecord {
    RuleRecord {
        user: user.into(),
        resource: resource.into(),
        actions: actions.iter().map(|a| a.to_string()).collect(),
        deny,
        source: String::new(),
        created_ms: 0,
    }
}

fn user(auth: &Auth, name: &str) -> Identity {
    Identity::User {
        name: name.into(),
        since_ms: auth.credential(name).unwrap().1,
    }
}

#[tokio::test]
async fn an_open_broker_closes_with_its_first_user() {
    let (auth, map) = (Auth::open(), Map::default());
    let topic = Resource::Topic("orders");
    auth.check(&Identity::Anonymous, Action::Pub, &topic, None)
        .unwrap();
    auth.create_user(&map, "admin", "s3cret-admin", true)
        .await
        .unwrap();
    assert!(matches!(
        auth.check(&Identity::Anonymous, Action::Pub, &topic, None),
        Err(Error::NotAuthenticated(_))
    ));
    auth.check(
        &user(&auth, "admin"),
        Action::Admin,
        &Resource::Cluster,
        None,
    )
    .unwrap();
    auth.check(&Identity::Token, Action::Admin, &Resource::Cluster, None)
        .unwrap();
    assert!(map.users.lock().unwrap().contains_key("admin"));
}

#[tokio::test]
async fn rules_decide_a_normal_user_and_a_revoke_takes_effect_at_once() {
    let (auth, map) = (Auth::open(), Map::default());
    auth.create_user(&map, "admin", "s3cret-admin", true)
        .await
        .unwrap();
    auth.create_user(&map, "app", "s3cret-app", false)
        .await
        .unwrap();
    let app = user(&auth, "app");
    let orders = Resource::Topic("orders");
    let denied = auth.check(&app, Action::Pub, &orders, None).unwrap_err();
    assert!(denied.to_string().contains("no rule allows it"), "{denied}");
    let granted = auth
        .grant(&map, rule("app", "topic:ord*", &["pub"], false))
        .await
        .unwrap();
    auth.check(&app, Action::Pub, &orders, None).unwrap();
    // The same rule again is the same rule.
    let again = auth
        .grant(&map, rule("app", "topic:ord*", &["pub"], false))
        .await
        .unwrap();
    assert_eq!(again.id, granted.id);
    let deny = auth
        .grant(&map, rule("app", "topic:orders", &["pub"], true))
        .await
        .unwrap();
    let e = auth.check(&app, Action::Pub, &orders, None).unwrap_err();
    assert!(
        e.to_string().contains(&format!("rule {} denies", deny.id)),
        "{e}"
    );
    auth.revoke(&map, Some(deny.id), None).await.unwrap();
    auth.check(&app, Action::Pub, &orders, None).unwrap();
    auth.revoke(&map, None, Some(rule("app", "topic:ord*", &["pub"], false)))
        .await
        .unwrap();
    // Ids are never given twice, even after the highest is revoked.
    let later = auth
        .grant(&map, rule("app", "topic:x", &["read"], false))
        .await
        .unwrap();
    assert!(later.id > deny.id, "{} after {}", later.id, deny.id);
    auth.revoke(&map, Some(later.id), None).await.unwrap();
    assert!(auth.check(&app, Action::Pub, &orders, None).is_err());
    assert!(map.rules.lock().unwrap().is_empty());
    let (allowed, reason, _) = auth.explain("app", &[Action::Pub], &orders, None).unwrap();
    assert!(!allowed && reason.contains("no rule"), "{reason}");
}

#[tokio::test]
async fn a_new_secret_or_a_deletion_refuses_the_users_sessions() {
    let (auth, map) = (Auth::open(), Map::default());
    auth.create_user(&map, "admin", "s3cret-admin", true)
        .await
        .unwrap();
    auth.create_user(&map, "app", "s3cret-app", true)
        .await
        .unwrap();
    let before = user(&auth, "app");
    auth.passwd(&map, "app", "another-secret").await.unwrap();
    assert!(matches!(
        auth.check(&before, Action::Read, &Resource::Cluster, None),
        Err(Error::NotAuthenticated(_))
    ));
    let after = user(&auth, "app");
    auth.check(&after, Action::Read, &Resource::Cluster, None)
        .unwrap();
    auth.grant(&map, rule("app", "cluster", &["read"], false))
        .await
        .unwrap();
    auth.delete_user(&map, "app").await.unwrap();
    assert!(matches!(
        auth.check(&after, Action::Read, &Resource::Cluster, None),
        Err(Error::NotAuthenticated(_))
    ));
    assert!(auth.rules(None).is_empty(), "a user's rules go with it");
}

#[tokio::test]
async fn the_last_super_user_stays_and_the_broker_stays_closed() {
    let (auth, map) = (Auth::open(), Map::default());
    auth.create_user(&map, "admin", "s3cret-admin", true)
        .await
        .unwrap();
    auth.create_user(&map, "app", "s3cret-app", false)
        .await
        .unwrap();
    assert!(auth.delete_user(&map, "admin").await.is_err());
    auth.delete_user(&map, "app").await.unwrap();
    assert!(auth.delete_user(&map, "admin").await.is_err());
    assert!(auth.active());
    auth.create_user(&map, "admin2", "s3cret-admin", true)
        .await
        .unwrap();
    auth.delete_user(&map, "admin").await.unwrap();
    assert!(auth.active());
}

#[tokio::test]
async fn bad_names_secrets_and_duplicates_are_refused() {
    let (auth, map) = (Auth::open(), Map::default());
    assert!(
        auth.create_user(&map, "a b", "s3cret-ok", false)
            .await
            .is_err()
    );
    for bad in ["", "a%b", "token", "anonymous"] {
        assert!(
            auth.create_user(&map, bad, "s3cret-ok", false)
                .await
                .is_err(),
            "{bad:?}"
        );
    }
    assert!(
        auth.create_user(&map, "short", "1234567", false)
            .await
            .is_err()
    );
    auth.create_user(&map, "app", "s3cret-app", false)
        .await
        .unwrap();
    assert!(
        auth.create_user(&map, "app", "s3cret-app", false)
            .await
            .is_err()
    );
    assert!(
        auth.grant(&map, rule("nobody", "cluster", &["read"], false))
            .await
            .is_err()
    );
    assert!(
        auth.grant(&map, rule("app", "queue:x", &["read"], false))
            .await
            .is_err()
    );
}

#[test]
fn the_credential_verifies_the_secret_it_was_made_from() {
    use txmq_protocol::scram::{ClientExchange, ServerExchange};
    let record = user_record("s3cret-app", false, 1, 1);
    let cred = credential(&record).unwrap();
    let (client, first) = ClientExchange::start("app", "cnonce");
    let (_, partial) = ServerExchange::start(&first).unwrap();
    let server = partial.challenge(&cred, "snonce");
    let fin = client.answer(server.server_first(), b"s3cret-app").unwrap();
    let sig = server.finish(&fin.message, &cred).unwrap();
    fin.verify(&sig).unwrap();
    // Nothing stored is the secret.
    let bytes = prost::Message::encode_to_vec(&record);
    assert!(!bytes.windows(10).any(|w| w == b"s3cret-app"));
}
