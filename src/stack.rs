//! The request path, assembled in one place (outermost first).

use crate::app::App;
use crate::policy::AuthGateLayer;
use crate::proxy::forward::{Forward, HeaderHygieneLayer};
use crate::refresh::RefreshLayer;
use crate::router::{RequestIdLayer, Router};
use crate::session::layer::SessionLayer;
use std::sync::Arc;
use tower::ServiceBuilder;

pub fn build(
    app: Arc<App>,
) -> crate::router::RequestId<
    Router<
        crate::session::layer::SessionService<
            crate::refresh::RefreshService<
                crate::policy::AuthGate<crate::proxy::forward::HeaderHygiene<Forward>>,
            >,
        >,
    >,
> {
    let routes = ServiceBuilder::new()
        .layer(SessionLayer::new(app.clone()))
        .layer(RefreshLayer::new(app.clone()))
        .layer(AuthGateLayer::new(app.clone()))
        .layer(HeaderHygieneLayer::new(app.clone()))
        .service(Forward::new(app.clone()));
    ServiceBuilder::new()
        .layer(RequestIdLayer::new(app.clone()))
        .service(Router::new(app, routes))
}
