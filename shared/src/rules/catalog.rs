//! What the rules API does, without HTTP (the routes are `http::rules`): the rules in force,
//! configured (`"origin": "config"`) and stored (`"origin": "store"`), and changes to the
//! stored ones. Configured rules cannot be replaced or deleted here: change the configuration
//! instead.
//!
//! The configured rules are the ones loaded and validated at start-up (the same list the
//! [`super::fire::RuleFirer`] fires), so the API never shows rules that are not the ones firing,
//! even when `KITEBRIDGE_RULES_FILE` changes on disk afterwards.

use std::sync::Arc;

use chrono::Utc;
use serde::Serialize;
use serde_json::{Map, Value};

use super::{Rule, RuleError, validate_name};
use crate::store::{RuleStore, Store, StoreError, StoredRule};

/// Why a rules API operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The name in the path is not a rule name.
    #[error("{0}")]
    InvalidName(String),
    #[error("no rule named {0:?}")]
    NotFound(String),
    /// The rule is configured (`KITEBRIDGE_RULES` / `KITEBRIDGE_RULES_FILE`); `action` is what
    /// the caller tried (`change`, `remove`).
    #[error("rule {name:?} is defined in the configuration; {action} it there")]
    Configured { name: String, action: &'static str },
    /// The document does not validate.
    #[error(transparent)]
    Invalid(RuleError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

/// One rule as the API shows it: its name, where it comes from, and its document's fields.
#[derive(Debug, Clone, Serialize)]
pub struct RuleView {
    pub name: String,
    pub origin: Origin,
    #[serde(flatten)]
    pub document: Map<String, Value>,
}

/// Where a rule in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Config,
    Store,
}

impl RuleView {
    fn new(name: &str, origin: Origin, document: &Value) -> RuleView {
        RuleView {
            name: name.to_owned(),
            origin,
            document: document.as_object().cloned().unwrap_or_default(),
        }
    }

    fn configured(rule: &Rule) -> RuleView {
        RuleView::new(&rule.name, Origin::Config, &document_json(rule))
    }
}

fn document_json(rule: &Rule) -> Value {
    serde_json::to_value(&rule.document).unwrap_or(Value::Null)
}

/// The rules API's operations over the configured rules and the store.
#[derive(Clone)]
pub struct RuleCatalog {
    configured: Arc<Vec<Rule>>,
    store: Store,
}

impl RuleCatalog {
    /// `configured` is the list loaded at start-up (validated, shared with the firer).
    pub fn new(configured: Arc<Vec<Rule>>, store: Store) -> RuleCatalog {
        RuleCatalog { configured, store }
    }

    fn configured(&self, name: &str) -> Option<&Rule> {
        self.configured.iter().find(|r| r.name == name)
    }

    /// Every rule in force: the configured ones, then the stored ones.
    pub async fn list(&self) -> Result<Vec<RuleView>, CatalogError> {
        let mut rules: Vec<RuleView> = self.configured.iter().map(RuleView::configured).collect();
        let stored = self.store.rules().await?;
        rules.extend(
            stored
                .iter()
                .map(|s| RuleView::new(&s.name, Origin::Store, &s.document)),
        );
        Ok(rules)
    }

    pub async fn get(&self, name: &str) -> Result<RuleView, CatalogError> {
        if let Some(r) = self.configured(name) {
            return Ok(RuleView::configured(r));
        }
        match self.store.rule(name).await? {
            Some(s) => Ok(RuleView::new(&s.name, Origin::Store, &s.document)),
            None => Err(CatalogError::NotFound(name.to_owned())),
        }
    }

    /// Checks a name before anything else is looked at.
    pub fn check_name(name: &str) -> Result<(), CatalogError> {
        validate_name(name).map_err(CatalogError::InvalidName)
    }

    /// Validates `document` and stores it as rule `name`; `true` when it was created (not
    /// replaced).
    pub async fn put(&self, name: &str, document: Value) -> Result<(RuleView, bool), CatalogError> {
        Self::check_name(name)?;
        if self.configured(name).is_some() {
            return Err(CatalogError::Configured {
                name: name.to_owned(),
                action: "change",
            });
        }
        let rule = Rule::from_json(name, document).map_err(CatalogError::Invalid)?;
        let document = document_json(&rule);
        let stored = StoredRule {
            name: name.to_owned(),
            document: document.clone(),
            updated_at: Utc::now(),
        };
        let created = self.store.put_rule(&stored).await?;
        Ok((RuleView::new(name, Origin::Store, &document), created))
    }

    pub async fn delete(&self, name: &str) -> Result<(), CatalogError> {
        if self.configured(name).is_some() {
            return Err(CatalogError::Configured {
                name: name.to_owned(),
                action: "remove",
            });
        }
        if self.store.delete_rule(name).await? {
            Ok(())
        } else {
            Err(CatalogError::NotFound(name.to_owned()))
        }
    }
}
