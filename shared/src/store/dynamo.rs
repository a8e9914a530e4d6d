//! The DynamoDB backend for the Lambda functions: one table, `PK`/`SK` string keys.
//!
//! Every conditional write is a DynamoDB condition expression: `attribute_not_exists(PK)` (or an
//! expired `expires_at`, since TTL deletes lazily) for "absent", `rev = :rev` for
//! compare-and-set. Batches of more than one write are one `TransactWriteItems`. Reads are
//! strongly consistent, because every read here precedes a compare-and-set.

use std::collections::HashMap;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, KeySchemaElement, KeyType, Put,
    ScalarAttributeType, TimeToLiveSpecification, TransactWriteItem,
};

use super::StoreError;
use super::kv::{Cond, Item, Kv, MAX_BATCH, Order, Write, is_live, now_epoch};

/// The TTL attribute (epoch seconds). `ttl` itself is a DynamoDB reserved word.
pub const TTL_ATTRIBUTE: &str = "expires_at";

#[derive(Clone, Debug)]
pub struct DynamoKv {
    client: Client,
    table: String,
}

type Attrs = HashMap<String, AttributeValue>;

impl DynamoKv {
    pub fn new(client: Client, table: impl Into<String>) -> DynamoKv {
        DynamoKv {
            client,
            table: table.into(),
        }
    }

    /// A client from an SDK configuration (the standard AWS configuration chain on Lambda: the
    /// function's role; `AWS_ENDPOINT_URL_DYNAMODB` or `AWS_ENDPOINT_URL` is honoured, for local
    /// emulators).
    pub fn from_sdk_config(sdk: &aws_config::SdkConfig, table: impl Into<String>) -> DynamoKv {
        DynamoKv::new(Client::new(sdk), table)
    }

    pub fn table(&self) -> &str {
        &self.table
    }

    /// Creates the table as `template.yaml` does (on-demand, `PK`/`SK`, TTL on `expires_at`).
    /// For tests and local runs; on AWS the stack owns the table.
    pub async fn create_table(&self) -> Result<(), StoreError> {
        let key = |name: &str, t: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(t)
                .build()
        };
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
        };
        self.client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .key_schema(key("PK", KeyType::Hash).map_err(config_err)?)
            .key_schema(key("SK", KeyType::Range).map_err(config_err)?)
            .attribute_definitions(attr("PK").map_err(config_err)?)
            .attribute_definitions(attr("SK").map_err(config_err)?)
            .send()
            .await
            .map_err(sdk_err)?;
        self.client
            .update_time_to_live()
            .table_name(&self.table)
            .time_to_live_specification(
                TimeToLiveSpecification::builder()
                    .enabled(true)
                    .attribute_name(TTL_ATTRIBUTE)
                    .build()
                    .map_err(config_err)?,
            )
            .send()
            .await
            .map_err(sdk_err)?;
        Ok(())
    }
}

fn config_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Config(e.to_string())
}

fn sdk_err<E, R>(e: SdkError<E, R>) -> StoreError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    match e.as_service_error().and_then(|s| s.code()) {
        Some("ResourceNotFoundException") => {
            StoreError::Config(format!("{}", DisplayErrorContext(&e)))
        }
        _ => StoreError::Unavailable(format!("dynamodb: {}", DisplayErrorContext(&e))),
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_string())
}

fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn key(pk: &str, sk: &str) -> Attrs {
    HashMap::from([("PK".to_string(), s(pk)), ("SK".to_string(), s(sk))])
}

fn to_attrs(item: &Item) -> Attrs {
    let mut a = key(&item.pk, &item.sk);
    a.insert("rev".into(), n(item.rev));
    a.insert("doc".into(), s(&item.doc));
    if let Some(t) = item.expires_at {
        a.insert(TTL_ATTRIBUTE.into(), n(t));
    }
    a
}

fn from_attrs(a: &Attrs) -> Result<Item, StoreError> {
    let text = |name: &str| a.get(name).and_then(|v| v.as_s().ok()).cloned();
    let num = |name: &str| {
        a.get(name)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<i64>().ok())
    };
    let (pk, sk) = (
        text("PK").unwrap_or_default(),
        text("SK").unwrap_or_default(),
    );
    let corrupt = |message: &str| StoreError::Corrupt {
        pk: pk.clone(),
        sk: sk.clone(),
        message: message.to_string(),
    };
    Ok(Item {
        rev: num("rev").ok_or_else(|| corrupt("missing or malformed `rev`"))? as u64,
        doc: text("doc").ok_or_else(|| corrupt("missing `doc`"))?,
        expires_at: num(TTL_ATTRIBUTE),
        pk: pk.clone(),
        sk: sk.clone(),
    })
}

/// Condition expression and values for `cond`, or `None` for unconditional writes.
fn condition(cond: Cond) -> Option<(String, Attrs)> {
    match cond {
        Cond::Always => None,
        Cond::Absent => Some((
            format!("attribute_not_exists(PK) OR {TTL_ATTRIBUTE} <= :now"),
            HashMap::from([(":now".to_string(), n(now_epoch()))]),
        )),
        Cond::Rev(rev) => Some((
            "rev = :rev".to_string(),
            HashMap::from([(":rev".to_string(), n(rev))]),
        )),
    }
}

#[async_trait]
impl Kv for DynamoKv {
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>, StoreError> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .map_err(sdk_err)?;
        match out.item() {
            None => Ok(None),
            Some(a) => {
                let item = from_attrs(a)?;
                Ok(is_live(&item, now_epoch()).then_some(item))
            }
        }
    }

    async fn write(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        match writes.len() {
            0 => Ok(()),
            1 => {
                self.write_one(writes.into_iter().next().unwrap_or_else(|| unreachable!()))
                    .await
            }
            n if n > MAX_BATCH => Err(StoreError::Config(format!(
                "a batch holds at most {MAX_BATCH} writes"
            ))),
            _ => self.write_many(writes).await,
        }
    }

    async fn query(
        &self,
        pk: &str,
        sk_prefix: &str,
        after: Option<&str>,
        limit: usize,
        order: Order,
    ) -> Result<Vec<Item>, StoreError> {
        let mut items = Vec::new();
        let mut start: Option<Attrs> = after.map(|a| key(pk, a));
        let now = now_epoch();
        while items.len() < limit {
            let mut q = self
                .client
                .query()
                .table_name(&self.table)
                .consistent_read(true)
                .expression_attribute_values(":pk", s(pk));
            // DynamoDB refuses an empty begins_with operand; an empty prefix means "all".
            q = if sk_prefix.is_empty() {
                q.key_condition_expression("PK = :pk")
            } else {
                q.key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
                    .expression_attribute_values(":prefix", s(sk_prefix))
            };
            let out = q
                .scan_index_forward(order == Order::Ascending)
                .limit((limit - items.len()).min(1000) as i32)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(sdk_err)?;
            for a in out.items() {
                let item = from_attrs(a)?;
                if is_live(&item, now) {
                    items.push(item);
                }
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => break,
            }
        }
        items.truncate(limit);
        Ok(items)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.get("PING", "PING").await.map(|_| ())
    }
}

impl DynamoKv {
    async fn write_one(&self, write: Write) -> Result<(), StoreError> {
        let conditional =
            |e: &dyn ProvideErrorMetadata| e.code() == Some("ConditionalCheckFailedException");
        match write {
            Write::Put { item, cond } => {
                let (expr, values) = condition(cond).unzip();
                let r = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(to_attrs(&item)))
                    .set_condition_expression(expr)
                    .set_expression_attribute_values(values)
                    .send()
                    .await;
                match r {
                    Ok(_) => Ok(()),
                    Err(e) if e.as_service_error().is_some_and(|s| conditional(s)) => {
                        Err(StoreError::Conflict)
                    }
                    Err(e) => Err(sdk_err(e)),
                }
            }
            Write::Delete { pk, sk, cond } => {
                let (expr, values) = condition(cond).unzip();
                let r = self
                    .client
                    .delete_item()
                    .table_name(&self.table)
                    .set_key(Some(key(&pk, &sk)))
                    .set_condition_expression(expr)
                    .set_expression_attribute_values(values)
                    .send()
                    .await;
                match r {
                    Ok(_) => Ok(()),
                    Err(e) if e.as_service_error().is_some_and(|s| conditional(s)) => {
                        Err(StoreError::Conflict)
                    }
                    Err(e) => Err(sdk_err(e)),
                }
            }
        }
    }

    async fn write_many(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut items = Vec::with_capacity(writes.len());
        for w in writes {
            let twi = match w {
                Write::Put { item, cond } => {
                    let (expr, values) = condition(cond).unzip();
                    let put = Put::builder()
                        .table_name(&self.table)
                        .set_item(Some(to_attrs(&item)))
                        .set_condition_expression(expr)
                        .set_expression_attribute_values(values)
                        .build()
                        .map_err(config_err)?;
                    TransactWriteItem::builder().put(put).build()
                }
                Write::Delete { pk, sk, cond } => {
                    let (expr, values) = condition(cond).unzip();
                    let delete = Delete::builder()
                        .table_name(&self.table)
                        .set_key(Some(key(&pk, &sk)))
                        .set_condition_expression(expr)
                        .set_expression_attribute_values(values)
                        .build()
                        .map_err(config_err)?;
                    TransactWriteItem::builder().delete(delete).build()
                }
            };
            items.push(twi);
        }
        let r = self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) => {
                // A cancelled transaction whose reasons include a failed condition, or a
                // conflicting concurrent transaction, is a lost compare-and-set: the caller
                // re-reads and decides again.
                let cancelled = match e.as_service_error() {
                    Some(TransactWriteItemsError::TransactionCanceledException(c)) => Some(c),
                    _ => None,
                };
                if let Some(c) = cancelled {
                    let lost = c.cancellation_reasons().iter().any(|r| {
                        matches!(
                            r.code(),
                            Some("ConditionalCheckFailed") | Some("TransactionConflict")
                        )
                    });
                    if lost {
                        return Err(StoreError::Conflict);
                    }
                }
                if e.as_service_error().and_then(|s| s.code())
                    == Some("TransactionConflictException")
                {
                    return Err(StoreError::Conflict);
                }
                Err(sdk_err(e))
            }
        }
    }
}
