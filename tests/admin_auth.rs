//! The admin API's read-only token: reads pass, every write is refused with
//! PERMISSION_DENIED and changes nothing; the admin token still writes.

mod common;

use common::{TestServer, ADMIN_TOKEN, READ_ONLY_TOKEN};
use sluice::proto::admin::admin_service_client::AdminServiceClient;
use sluice::proto::admin::{
    ApiKey, CreateApiKeyRequest, CreateUsagePlanKeyRequest, CreateUsagePlanRequest,
    DeleteApiKeyRequest, DeleteUsagePlanRequest, GetUsagePlanRequest, GetUsageRequest,
    ListApiKeysRequest, ListUsagePlansRequest, UpdateUsagePlanRequest, UpdateUsageRequest,
    UsagePlan,
};
use tonic::Code;

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

#[tokio::test]
async fn the_read_only_token_reads_but_never_writes() {
    let server = TestServer::start("domain: other\ndescriptors: []\n").await;
    let mut admin = server.admin().await;
    let plan = UsagePlan {
        name: "gold".into(),
        ..Default::default()
    };
    admin
        .create_usage_plan(CreateUsagePlanRequest {
            usage_plan: Some(plan.clone()),
        })
        .await
        .expect("the admin token writes");
    admin
        .create_api_key(CreateApiKeyRequest {
            api_key: Some(ApiKey {
                name: "alice".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("the admin token writes");

    let mut ro = AdminServiceClient::connect(format!("http://{}", server.admin_addr))
        .await
        .unwrap();
    let t = READ_ONLY_TOKEN;
    let got = ro
        .get_usage_plan(with_token(
            GetUsagePlanRequest {
                plan: "gold".into(),
            },
            t,
        ))
        .await
        .expect("reads are allowed")
        .into_inner();
    assert_eq!(got.name, "gold");
    let plans = ro
        .list_usage_plans(with_token(ListUsagePlansRequest::default(), t))
        .await
        .expect("reads are allowed")
        .into_inner();
    assert_eq!(plans.usage_plans.len(), 1);
    ro.list_api_keys(with_token(ListApiKeysRequest::default(), t))
        .await
        .expect("reads are allowed");
    ro.get_usage(with_token(
        GetUsageRequest {
            plan: "gold".into(),
            start_date: "2026-01-01".into(),
            end_date: "2026-01-02".into(),
            ..Default::default()
        },
        t,
    ))
    .await
    .expect("reads are allowed");
    // A validate-only update changes nothing: a read-only token may send it.
    let checked = ro
        .update_usage_plan(with_token(
            UpdateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    id: "gold".into(),
                    description: "checked, not made".into(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["description".into()],
                }),
                validate_only: true,
            },
            t,
        ))
        .await
        .expect("a validate-only update is allowed")
        .into_inner();
    assert_eq!(checked.description, "checked, not made");
    let still = ro
        .get_usage_plan(with_token(
            GetUsagePlanRequest {
                plan: "gold".into(),
            },
            t,
        ))
        .await
        .expect("reads are allowed")
        .into_inner();
    assert_eq!(still.description, "", "nothing changed");

    let denied = |r: Result<_, tonic::Status>, what: &str| {
        let s = r.expect_err(what);
        assert_eq!(s.code(), Code::PermissionDenied, "{what}: {s:?}");
        assert!(s.message().contains("read-only"), "{what}: {s:?}");
    };
    denied(
        ro.create_usage_plan(with_token(
            CreateUsagePlanRequest {
                usage_plan: Some(UsagePlan {
                    name: "silver".into(),
                    ..Default::default()
                }),
            },
            t,
        ))
        .await
        .map(|_| ()),
        "CreateUsagePlan",
    );
    denied(
        ro.delete_usage_plan(with_token(
            DeleteUsagePlanRequest {
                plan: "gold".into(),
                force: true,
            },
            t,
        ))
        .await
        .map(|_| ()),
        "DeleteUsagePlan",
    );
    denied(
        ro.create_usage_plan_key(with_token(
            CreateUsagePlanKeyRequest {
                plan: "gold".into(),
                key: "alice".into(),
            },
            t,
        ))
        .await
        .map(|_| ()),
        "CreateUsagePlanKey",
    );
    denied(
        ro.delete_api_key(with_token(
            DeleteApiKeyRequest {
                key: "alice".into(),
            },
            t,
        ))
        .await
        .map(|_| ()),
        "DeleteApiKey",
    );
    denied(
        ro.update_usage(with_token(
            UpdateUsageRequest {
                plan: "gold".into(),
                key: "alice".into(),
                remaining: 5,
            },
            t,
        ))
        .await
        .map(|_| ()),
        "UpdateUsage",
    );

    // Nothing changed.
    let plans = admin
        .list_usage_plans(ListUsagePlansRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(plans.usage_plans.len(), 1);
    let keys = admin
        .list_api_keys(ListApiKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.api_keys.len(), 1);
    assert!(keys.api_keys[0].usage_plan_ids.is_empty());
    drop(admin);
    drop(ro);
    server.shutdown().await;
}

/// The auth scheme is case-insensitive (RFC 9110): `bearer`, `BEARER` and
/// `Bearer` all carry the token; another scheme or no token is refused.
#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive() {
    let server = TestServer::start("domain: other\ndescriptors: []\n").await;
    let mut c = AdminServiceClient::connect(format!("http://{}", server.admin_addr))
        .await
        .unwrap();
    let list = |auth: String| {
        let mut r = tonic::Request::new(ListUsagePlansRequest::default());
        r.metadata_mut()
            .insert("authorization", auth.parse().unwrap());
        r
    };
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        c.list_usage_plans(list(format!("{scheme} {ADMIN_TOKEN}")))
            .await
            .unwrap_or_else(|s| panic!("{scheme}: {s:?}"));
    }
    for auth in [
        format!("Basic {ADMIN_TOKEN}"),
        "Bearer".to_owned(),
        ADMIN_TOKEN.to_owned(),
    ] {
        let e = c.list_usage_plans(list(auth.clone())).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{auth}: {e:?}");
    }
}
