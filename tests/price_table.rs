//! The shared price table: prices for models a plan does not price itself,
//! managed through the admin API, used by SPEND limits, persisted.

mod common;

use common::{TestServer, READ_ONLY_TOKEN};
use sluice::proto::admin::admin_service_client::AdminServiceClient;
use sluice::proto::admin::{
    ApiKey, ApiStage, CreateApiKeyRequest, CreateUsagePlanKeyRequest, CreateUsagePlanRequest,
    GetPriceTableRequest, LimitWindow, Metric, ModelPrice, PriceTable, UpdatePriceTableRequest,
    UsageLimit, UsagePlan,
};
use sluice::proto::usage::usage_service_client::UsageServiceClient;
use sluice::proto::usage::ReportUsageRequest;
use tonic::Code;

fn price(input: i64, output: i64) -> ModelPrice {
    ModelPrice {
        input_per_million: input,
        output_per_million: output,
    }
}

fn budget_plan(prices: &[(&str, ModelPrice)]) -> UsagePlan {
    UsagePlan {
        name: "spend".into(),
        stages: vec![ApiStage {
            domain: "llm".into(),
            ..Default::default()
        }],
        limits: vec![UsageLimit {
            name: "budget".into(),
            metric: Metric::Spend as i32,
            limit: 1_000_000_000,
            window: LimitWindow::CalendarMonth as i32,
            anchor_day: 1,
            ..Default::default()
        }],
        prices: prices.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
        ..Default::default()
    }
}

/// The budget's remaining after one report of 1M input + 1M output tokens.
async fn spend_of(server: &TestServer, key: &str, model: &str, id: &str) -> i64 {
    let mut usage = UsageServiceClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let r = usage
        .report_usage(ReportUsageRequest {
            domain: "llm".into(),
            api_key: key.into(),
            model: model.into(),
            input_tokens: 1_000_000,
            output_tokens: 1_000_000,
            request_id: id.into(),
            ..Default::default()
        })
        .await
        .expect("report")
        .into_inner();
    let b = r
        .limits
        .iter()
        .find(|l| l.name == "spend/budget")
        .expect("budget state");
    b.limit - b.remaining
}

#[tokio::test]
async fn spend_uses_the_shared_table_for_models_the_plan_does_not_price() {
    let server = TestServer::start("domain: other\ndescriptors: []\n").await;
    let mut admin = server.admin().await;

    // A SPEND limit with no prices anywhere is refused, naming the limit.
    let err = admin
        .create_usage_plan(CreateUsagePlanRequest {
            usage_plan: Some(budget_plan(&[])),
        })
        .await
        .expect_err("no prices anywhere");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("limits[0].metric") && err.message().contains("prices"),
        "{err:?}"
    );

    let table = PriceTable {
        prices: [
            ("gpt-4o*".to_owned(), price(2_500_000, 10_000_000)),
            ("claude-*".to_owned(), price(3_000_000, 15_000_000)),
        ]
        .into(),
    };
    let got = admin
        .update_price_table(UpdatePriceTableRequest {
            price_table: Some(table.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, table);

    // Now the plan is accepted; it prices only gpt-4o itself.
    admin
        .create_usage_plan(CreateUsagePlanRequest {
            usage_plan: Some(budget_plan(&[("gpt-4o", price(1_000_000, 1_000_000))])),
        })
        .await
        .expect("prices exist in the shared table");
    let key = admin
        .create_api_key(CreateApiKeyRequest {
            api_key: Some(ApiKey {
                name: "k".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .value;
    admin
        .create_usage_plan_key(CreateUsagePlanKeyRequest {
            plan: "spend".into(),
            key: "k".into(),
        })
        .await
        .unwrap();

    // The plan's own price wins for gpt-4o: 1.00 + 1.00 = 2_000_000.
    assert_eq!(spend_of(&server, &key, "gpt-4o", "a").await, 2_000_000);
    // gpt-4o-mini is priced by the shared table: 2.50 + 10.00 more.
    assert_eq!(
        spend_of(&server, &key, "gpt-4o-mini", "b").await,
        14_500_000
    );
    // claude-3 too: 3.00 + 15.00 more.
    assert_eq!(spend_of(&server, &key, "claude-3", "c").await, 32_500_000);
    // A model priced nowhere costs nothing.
    assert_eq!(spend_of(&server, &key, "mistral", "d").await, 32_500_000);

    // Emptying the table would leave... no: the plan has its own prices, so
    // it is allowed; a plan without its own prices forbids it.
    let mut bare = budget_plan(&[]);
    bare.name = "bare".into();
    bare.stages[0].domain = "llm2".into();
    admin
        .create_usage_plan(CreateUsagePlanRequest {
            usage_plan: Some(bare),
        })
        .await
        .unwrap();
    let err = admin
        .update_price_table(UpdatePriceTableRequest {
            price_table: Some(PriceTable::default()),
        })
        .await
        .expect_err("bare relies on the table");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("bare"), "{err:?}");

    // The read-only token reads the table but cannot change it.
    let mut ro = AdminServiceClient::connect(format!("http://{}", server.admin_addr))
        .await
        .unwrap();
    let mut get = tonic::Request::new(GetPriceTableRequest {});
    get.metadata_mut().insert(
        "authorization",
        format!("Bearer {READ_ONLY_TOKEN}").parse().unwrap(),
    );
    assert_eq!(ro.get_price_table(get).await.unwrap().into_inner(), table);
    let mut put = tonic::Request::new(UpdatePriceTableRequest {
        price_table: Some(PriceTable::default()),
    });
    put.metadata_mut().insert(
        "authorization",
        format!("Bearer {READ_ONLY_TOKEN}").parse().unwrap(),
    );
    assert_eq!(
        ro.update_price_table(put).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    drop(ro);
    drop(admin);

    // The table survives a restart.
    let dir = server.shutdown().await;
    let server = TestServer::builder()
        .config("domain: other\ndescriptors: []\n")
        .data_dir(dir)
        .start()
        .await;
    let mut admin = server.admin().await;
    assert_eq!(
        admin
            .get_price_table(GetPriceTableRequest {})
            .await
            .unwrap()
            .into_inner(),
        table
    );
    drop(admin);
    server.shutdown().await;
}
