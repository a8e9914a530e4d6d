//! kitebridge-fakes: **simulations** of Buildkite's REST API and webhooks and of Bitbucket's
//! build-status APIs, served on 127.0.0.1 for kitebridge's integration tests, benchmarks and
//! newcomer sandbox.
//!
//! These are not Buildkite or Bitbucket. They are small in-memory servers that play the parts
//! of the public APIs kitebridge uses and enforce the rules documented for them (see
//! `shared/reference/buildkite.md` §1–2 and `shared/reference/bitbucket.md` §2), so that a client
//! that breaks one of those rules fails its test here instead of in production. Anything the
//! documentation does not pin down is chosen and said so on the item concerned.
//!
//! - [`FakeBuildkite`]: `GET /v2/organizations/{org}/builds`,
//!   `GET|POST /v2/organizations/{org}/pipelines/{slug}/builds`,
//!   `GET .../builds/{number}`, `GET .../pipelines/{slug}`, `GET /v2/access-token`,
//!   `PUT .../builds/{number}/jobs/{id}/retry` and `PUT .../builds/{number}/retry_failed_jobs`
//!   (a retried job is a new job and the same build runs again: [`Job`]).
//!   Enforced: Bearer token (401) and its scopes (403); unknown organization or pipeline (404);
//!   newest-created-first order; filters `created_from`, `created_to` (exclusive),
//!   `finished_from` (ISO 8601, 422 when unparseable), `state`/`state[]` (incl. `finished`;
//!   unknown values 422), `branch`/`branch[]` (`*` wildcards), `commit`/`commit[]` (exact, so
//!   short SHAs match nothing), `creator`, `meta_data[k]`; `exclude_jobs`, `exclude_pipeline`;
//!   `page` and `per_page` (default 30, above 100 refused with 400) with a `Link` header
//!   (`next`, `last`, `first`, `prev`, absolute URLs keeping the query); the organization rate
//!   limit per window (and optionally the per-user one) with `RateLimit-*` headers on every
//!   authenticated answer and Buildkite's 429 body; build creation (201, 422
//!   `Validation Failed` without `commit`/`branch`, 404 unknown pipeline). Its clock may be set
//!   off this machine's (`clock_offset`, also in the `Date` header), and its `Link` headers
//!   made wrong ([`LinkFault`]).
//! - [`WebhookDelivery`] / [`deliver_webhook`]: Buildkite webhook requests shaped like the real
//!   ones (`event`, `build` without jobs, `pipeline`, `sender`), with `X-Buildkite-Event` and
//!   either `X-Buildkite-Token` or `X-Buildkite-Signature`.
//! - [`FakeBitbucket`]: Server (legacy endpoint only), Data Center (legacy, repository-scoped
//!   from 7.4, capabilities) or Cloud (2.0 commit statuses). Enforced: Basic / Bearer
//!   credentials (401), access tokens Bearer-only; required fields, state values per API,
//!   field limits (255, `url` 450, Cloud `key` 40), full 40-hex commit SHA, fully qualified
//!   `ref`, registered repositories (404; DC project keys case-insensitive), JSON content type
//!   on Server/DC (415); same key on the same commit (and repository) replaces the status;
//!   optional per-user token-bucket rate limit with 429 and `Retry-After`.
//!   Beyond build statuses (`shared/reference/bitbucket-more.md` §1–4, §7), with the same
//!   credentials, error bodies and rate limit:
//!   - Data Center 7.16+ **deployments** (`.../commits/{id}/deployments` POST/GET/DELETE,
//!     `/rest/capabilities` and `/rest/api/latest/deployment/capabilities`, switchable off):
//!     all seven fields, 255/1024 lengths, state and `environment.type` enums, upsert on
//!     (commit, key, environment key, sequence number), GET/DELETE by the three query
//!     parameters, DELETE for [`FakeBitbucketOptions::admins`] only (401). Inspect with
//!     [`FakeBitbucket::deployments`] / [`FakeBitbucket::current_deployments`]
//!     ([`PostedDeployment`]).
//!   - Server/Data Center 5.15+ **Code Insights** (reports PUT/GET/DELETE and list, annotations
//!     POST 204/GET/DELETE, one annotation PUT/DELETE, commit-wide annotation search): key ≤50,
//!     title ≤450, details ≤2000, reporter ≤450, result PASS/FAIL, ≤6 typed `data` items, http(s)
//!     links, only the creator replaces (401), ≤1000 annotations per report (a batch over it is
//!     refused whole), no de-duplication, DELETE cascades.
//!   - Data Center 7.14+ **required builds** (`/rest/required-builds/.../condition[/{id}]`,
//!     `.../conditions`): 1–100 non-blank `buildParentKeys`, `refMatcher` required, matcher
//!     types enum, changes for repository admins only (401)
//!     ([`FakeBitbucket::required_build_conditions`]).
//!   - Cloud **commit reports** (`/2.0/.../commit/{c}/reports...`): result PASSED/FAILED/PENDING,
//!     `report_type` enum, ≤10 `data` items (LINK `text`), annotation batches of 1–100 as a JSON
//!     array, ≤1000 per report, `summary` ≤450, severity/type/result enums, `line` ≥1, no
//!     localhost links. Both kinds: [`FakeBitbucket::reports`] ([`StoredReport`]),
//!     [`FakeBitbucket::annotations`].
//!   - **Changelog sources** over a graph given with [`FakeBitbucket::add_commits`]
//!     ([`FakeCommit`]) and [`FakeBitbucket::add_pull_request`] ([`FakePullRequest`]): Server/DC
//!     `GET .../commits` (`since` exclusive, `until` inclusive, `path`, `merges`,
//!     `ignoreMissing`, 400 on unknown commits) and `.../commits/{id}/pull-requests`, paged with a
//!     `limit` cap ([`FakeBitbucketOptions::max_page_limit`]) and a **non-contiguous**
//!     `nextPageStart` (a `start` the fake did not issue is refused with 400); Cloud
//!     `GET .../commits[/{revision}]` (`include`/`exclude`/`path`, opaque `next` tokens, no
//!     `page`/`size`/`previous`, `pagelen` >100 refused) and `.../commit/{c}/pullrequests` (202
//!     until indexed, [`FakeBitbucketOptions::cloud_pr_index_polls`]).
//!
//! Both fakes log every request ([`RequestRecord`]), can add latency to every answer, and can
//! play [`Fault`]s (5xx, 429, hangs, dropped connections) for the next N requests or for a
//! while. Nothing here talks to anything but loopback.
//!
//! ```no_run
//! # async fn demo() {
//! use kitebridge_fakes::*;
//! let bk = FakeBuildkite::start(FakeBuildkiteOptions::default()).await;
//! bk.add_pipeline(Pipeline::new("acme-inc", "web", "Web", "ssh://git@bb:7999/proj/web.git"));
//! bk.add_build(Build::new("acme-inc", "web", "4e1f0c9b7a2d3e5f6a8b9c0d1e2f3a4b5c6d7e8f", "main")
//!     .with_state(BuildState::Passed));
//! let bb = FakeBitbucket::start(FakeBitbucketOptions::default()).await;
//! bb.add_repository("PROJ", "web");
//! // point the client under test at bk.url() and bb.url() ...
//! # }
//! ```

#![warn(missing_docs)]
// Handlers return the API's error answer as `Err(Response)`; boxing it would only add noise.
#![allow(clippy::result_large_err)]

mod bitbucket;
mod buildkite;
mod common;
mod jobs;
mod webhook;

pub use bitbucket::{
    BitbucketFlavour, Credential, DEFAULT_BITBUCKET_PASSWORD, DEFAULT_BITBUCKET_TOKEN,
    DEFAULT_BITBUCKET_USER, FakeBitbucket, FakeBitbucketOptions, FakeCommit, FakePullRequest,
    LengthUnit, PostedDeployment, PostedStatus, PullRequestState, StatusScope, StoredReport,
    TokenBucket,
};
pub use buildkite::{
    ApiToken, Build, BuildState, DEFAULT_BUILDKITE_TOKEN, DEFAULT_ORGANIZATION, DEFAULT_PER_PAGE,
    FakeBuildkite, FakeBuildkiteOptions, LinkFault, MAX_PER_PAGE, Pipeline,
};
pub use common::{Fault, RequestRecord};
pub use jobs::{Job, JobState, RetryRefused};
pub use webhook::{WebhookAuth, WebhookDelivery, WebhookEvent, deliver_webhook, sign_webhook};
