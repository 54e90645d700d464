//! The API's OpenAPI 3.1 description, built from the route table
//! ([`super::routes::ROUTES`]): every route is in it with its scope, path parameters,
//! request body schema (from the model's types) and error answers. Served at
//! `GET /api/v1/openapi.json` without a token.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use utoipa::openapi::path::{
    HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem,
};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, ObjectBuilder, OpenApi, OpenApiBuilder,
    PathsBuilder, Ref, RefOr, Required, ResponseBuilder, ResponsesBuilder, Schema, Type,
};

use super::routes::{Access, RouteSpec, ROUTES};

/// Collects the schemas a body's schema refers to.
pub(crate) type Components = Vec<(String, RefOr<Schema>)>;

/// A route's JSON body schema: registers it (and what it refers to) and returns a
/// reference to it.
pub(crate) fn json_body<T: utoipa::ToSchema>(components: &mut Components) -> RefOr<Schema> {
    T::schemas(components);
    components.push((T::name().into_owned(), T::schema()));
    RefOr::Ref(Ref::from_schema_name(T::name()))
}

/// The security scheme's name in the document.
const BEARER: &str = "bearer";

/// The document, built once.
pub(crate) fn document() -> &'static OpenApi {
    static DOCUMENT: OnceLock<OpenApi> = OnceLock::new();
    DOCUMENT.get_or_init(build)
}

/// `GET /api/v1/openapi.json`.
pub(crate) async fn serve() -> axum::response::Response {
    match document().to_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => super::ApiError(
            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("the API description does not serialize: {e}"),
        )
        .into_response(),
    }
}

fn build() -> OpenApi {
    let mut components: Components = Vec::new();
    let mut paths = PathsBuilder::new();
    for route in ROUTES {
        let operation = operation(route, &mut components);
        paths = paths.path(route.path, PathItem::new(method(route.method), operation));
    }
    let error = ObjectBuilder::new()
        .schema_type(Type::Object)
        .property(
            "error",
            ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("One sentence saying what was wrong.")),
        )
        .required("error")
        .build();
    let mut built = ComponentsBuilder::new()
        .schema("ApiError", error)
        .security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An admin token (scopes: read, metrics, jobs, packages, messages, billing, admin), \
                         a vendor's token or a sender's token.",
                    ))
                    .build(),
            ),
        );
    for (name, schema) in components {
        built = built.schema(name, schema);
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Herald admin API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "The admin API of herald-server. Every route declares the token scope it \
                     needs (`x-herald-scope`); orders arrive signed by the operator key and \
                     agents check them again.",
                ))
                .build(),
        )
        .paths(paths.build())
        .components(Some(built.build()))
        .build()
}

fn method(name: &str) -> HttpMethod {
    match name {
        "POST" => HttpMethod::Post,
        "PUT" => HttpMethod::Put,
        "DELETE" => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

/// The `{name}` segments of a path.
pub(crate) fn path_parameters(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|segment| segment.strip_prefix('{')?.strip_suffix('}'))
}

fn operation(route: &RouteSpec, components: &mut Components) -> utoipa::openapi::path::Operation {
    let tag = route.action.split('.').next().unwrap_or(route.action);
    let mut op = OperationBuilder::new()
        .operation_id(Some(route.action))
        .summary(Some(route.summary))
        .tag(tag);
    for name in path_parameters(route.path) {
        op = op.parameter(
            ParameterBuilder::new()
                .name(name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(Some(ObjectBuilder::new().schema_type(Type::String))),
        );
    }
    if let Some(body) = route.body {
        let schema = body(components);
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content(
                    "application/json",
                    ContentBuilder::new().schema(Some(schema)).build(),
                )
                .build(),
        ));
    } else if route.streams {
        op = op.request_body(Some(
            RequestBodyBuilder::new()
                .required(Some(Required::True))
                .content(
                    "application/octet-stream",
                    ContentBuilder::new()
                        .schema(Some(ObjectBuilder::new().schema_type(Type::String).format(
                            Some(utoipa::openapi::SchemaFormat::Custom("binary".into())),
                        )))
                        .build(),
                )
                .build(),
        ));
    }
    let error = |what: &str| {
        ResponseBuilder::new()
            .description(what)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(RefOr::Ref(Ref::from_schema_name("ApiError"))))
                    .build(),
            )
            .build()
    };
    let mut responses = ResponsesBuilder::new()
        .response(
            "200",
            ResponseBuilder::new().description("Done; the answer as JSON."),
        )
        .response("400", error("The request was malformed."))
        .response("404", error("Nothing by that name or id."))
        .response("409", error("It conflicts with what exists."))
        .response("413", error("The body is larger than the API takes."));
    match route.access {
        Access::Public => {}
        Access::Gateway => {
            op = op.security(SecurityRequirement::new(BEARER, ["sms-report-secret"]));
            responses = responses.response("401", error("Wrong or missing report secret."));
        }
        access => {
            let scope = access.scope().map(|s| s.as_str()).unwrap_or("admin");
            let mut scopes = vec![scope.to_string()];
            match access {
                Access::ScopeOrVendor(_) => scopes.push("vendor".into()),
                Access::ScopeOrSender(_) => scopes.push("sender".into()),
                _ => {}
            }
            op = op.security(SecurityRequirement::new(BEARER, scopes));
            responses = responses
                .response("401", error("Missing, wrong, expired or revoked token."))
                .response(
                    "403",
                    error("The token's scope does not include this route."),
                );
        }
    }
    let mut operation = op.responses(responses.build()).build();
    let scope = route
        .access
        .scope()
        .map(|s| s.as_str())
        .unwrap_or(match route.access {
            Access::Gateway => "gateway",
            _ => "public",
        });
    operation.extensions = Some({
        let mut extensions = utoipa::openapi::extensions::Extensions::default();
        extensions.insert("x-herald-scope".into(), serde_json::json!(scope));
        extensions
    });
    operation
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_described_with_its_scope() {
        let json: serde_json::Value = serde_json::from_str(&document().to_json().unwrap()).unwrap();
        for route in ROUTES {
            let op = &json["paths"][route.path][route.method.to_ascii_lowercase()];
            assert_eq!(
                op["operationId"], route.action,
                "{} {}",
                route.method, route.path
            );
            assert!(op["x-herald-scope"].is_string(), "{}", route.path);
            for name in path_parameters(route.path) {
                assert!(
                    op["parameters"]
                        .as_array()
                        .is_some_and(|ps| ps.iter().any(|p| p["name"] == name)),
                    "{} lacks parameter {name}",
                    route.path
                );
            }
        }
        let operations: usize = json["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| item.as_object().unwrap().len())
            .sum();
        assert_eq!(operations, ROUTES.len());
    }

    #[test]
    fn body_schemas_resolve() {
        let json: serde_json::Value = serde_json::from_str(&document().to_json().unwrap()).unwrap();
        let text = json.to_string();
        let mut rest = text.as_str();
        while let Some(at) = rest.find("#/components/schemas/") {
            rest = &rest[at + "#/components/schemas/".len()..];
            let name: String = rest.chars().take_while(|c| *c != '"').collect();
            assert!(
                json["components"]["schemas"][&name].is_object(),
                "schema {name} is referred to but not defined"
            );
        }
    }
}
