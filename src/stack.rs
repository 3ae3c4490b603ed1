//! The request path, assembled in one place (outermost first).

use crate::app::App;
use crate::metrics::{Observe, ObserveLayer};
use crate::policy::{AuthGate, AuthGateLayer};
use crate::proxy::forward::{Forward, HeaderHygiene, HeaderHygieneLayer};
use crate::refresh::{RefreshLayer, RefreshService};
use crate::router::{RequestId, RequestIdLayer, Router};
use crate::session::layer::{SessionLayer, SessionService};
use std::sync::Arc;
use tower::ServiceBuilder;

/// The whole request path, as one type.
pub type Gateway =
    RequestId<Observe<Router<SessionService<RefreshService<AuthGate<HeaderHygiene<Forward>>>>>>>;

pub fn build(app: Arc<App>) -> Gateway {
    let routes = ServiceBuilder::new()
        .layer(SessionLayer::new(app.clone()))
        .layer(RefreshLayer::new(app.clone()))
        .layer(AuthGateLayer::new(app.clone()))
        .layer(HeaderHygieneLayer::new(app.clone()))
        .service(Forward::new(app.clone()));
    ServiceBuilder::new()
        .layer(RequestIdLayer::new(app.clone()))
        .layer(ObserveLayer::new(
            app.metrics.clone(),
            app.cfg.headers.request_id.clone(),
        ))
        .service(Router::new(app, routes))
}
