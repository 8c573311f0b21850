//! Agent registration: trading a signature or an enrollment token for a short-lived JWT.

use serde::{Deserialize, Serialize};

use crate::schema;
use crate::validate::{Limits, Path, Validate, ValidationErrors, check_id, check_text};

/// Body of `POST /v1/agents/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The instance registering.
    pub instance_id: String,
    /// A one-time enrollment token, when the agent has no secret yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrollment_token: Option<String>,
    /// Host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Agent version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// `<os>-<arch>`, as the `X-Agent-Architecture` header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

impl Validate for RegisterRequest {
    fn validate(&self, limits: &Limits, at: &Path<'_>, errors: &mut ValidationErrors) {
        check_id(
            errors,
            &at.field("instance_id"),
            &self.instance_id,
            limits.max_id_len,
        );
        for (name, value) in [
            ("enrollment_token", &self.enrollment_token),
            ("hostname", &self.hostname),
            ("agent_version", &self.agent_version),
            ("architecture", &self.architecture),
        ] {
            if let Some(value) = value {
                check_text(errors, &at.field(name), value, 256);
            }
        }
    }
}

impl RegisterRequest {
    /// JSON Schema of this body (for the OpenAPI document).
    pub fn json_schema() -> serde_json::Value {
        // The same bound as `validate` uses for these fields.
        let max = 256;
        schema::object(
            &["instance_id"],
            &[
                ("instance_id", schema::id()),
                (
                    "enrollment_token",
                    schema::nullable(schema::plain_text(max)),
                ),
                ("hostname", schema::nullable(schema::plain_text(max))),
                ("agent_version", schema::nullable(schema::plain_text(max))),
                ("architecture", schema::nullable(schema::plain_text(max))),
            ],
        )
    }
}

/// Answer of `POST /v1/agents/register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterResponse {
    /// The registered instance.
    pub instance_id: String,
    /// EdDSA JWT for `Authorization: Bearer` on the live channel.
    pub token: String,
    /// Unix seconds when the token expires.
    pub expires_at: i64,
    /// A signing secret issued on enrollment; store it with mode 0600 and never log it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

impl RegisterResponse {
    /// JSON Schema of this answer (for the OpenAPI document): `secret` only after an
    /// enrollment token.
    pub fn json_schema() -> serde_json::Value {
        schema::object(
            &["instance_id", "token", "expires_at"],
            &[
                ("instance_id", schema::id()),
                ("token", serde_json::json!({ "type": "string" })),
                ("expires_at", serde_json::json!({ "type": "integer" })),
                ("secret", serde_json::json!({ "type": "string" })),
            ],
        )
    }
}

impl std::fmt::Display for RegisterResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "registered {} until {}",
            self.instance_id, self.expires_at
        )
    }
}
