import java.io.File
import org.json.JSONArray
import org.json.JSONObject
import uniffi.fleet_uniffi.FleetException
import uniffi.fleet_uniffi.Signer
import uniffi.fleet_uniffi.Verifier
import uniffi.fleet_uniffi.signV0
import uniffi.fleet_uniffi.validateHeartbeat
import uniffi.fleet_uniffi.verifyManifest
import kotlin.test.Test
import kotlin.test.assertEquals
import kotlin.test.assertFailsWith
import kotlin.test.assertTrue

/** The shared vectors in tests/vectors, through the Kotlin bindings. */
class VectorsTest {
    private fun load(name: String): List<JSONObject> {
        val dir = System.getProperty("fleet.vectors") ?: error("fleet.vectors is not set")
        val array = JSONArray(File(dir, name).readText())
        return (0 until array.length()).map { array.getJSONObject(it) }
    }

    private fun headersOf(c: JSONObject): Map<String, String> =
        if (c.getString("scheme") == "v0") {
            mapOf("X-Agent-Signature" to c.getString("signature"))
        } else {
            buildMap {
                put("Webhook-Signature", c.getString("signature"))
                if (!c.isNull("msg_id")) put("Webhook-Id", c.getString("msg_id"))
                if (!c.isNull("timestamp")) put("Webhook-Timestamp", c.getLong("timestamp").toString())
            }
        }

    @Test
    fun signingVectorsThroughSigner() {
        val cases = load("signing.json")
        assertTrue(cases.size >= 20)
        for (c in cases) {
            val body = c.getString("body").toByteArray()
            val signer = Signer(c.getString("secret"))
            if (c.getString("scheme") == "v0") {
                val matches = signV0(c.getString("secret"), body) == c.getString("signature").lowercase()
                assertEquals(c.getBoolean("valid"), matches, c.getString("name"))
                assertEquals(signer.signV0(body), signV0(c.getString("secret"), body))
            } else if (c.getBoolean("valid")) {
                signer.verify(body, headersOf(c), c.getLong("now"))
            } else {
                val e = assertFailsWith<FleetException.InvalidSignature>(c.getString("name")) {
                    signer.verify(body, headersOf(c), c.getLong("now"))
                }
                assertEquals(c.getString("error"), e.kind, c.getString("name"))
            }
        }
    }

    @Test
    fun signingVectorsThroughVerifier() {
        val addressed = load("signing.json").filter { JSONObject(it.getString("body")).has("instance_id") }
        assertTrue(addressed.size >= 20)
        for (c in addressed) {
            val id = JSONObject(c.getString("body")).getString("instance_id")
            val verifier = Verifier(JSONObject().put(id, c.getString("secret")).toString(), null, true)
            val body = c.getString("body").toByteArray()
            if (c.getBoolean("valid")) {
                assertEquals(id, verifier.verify(body, headersOf(c), c.getLong("now")), c.getString("name"))
            } else {
                val e = assertFailsWith<FleetException.InvalidSignature>(c.getString("name")) {
                    verifier.verify(body, headersOf(c), c.getLong("now"))
                }
                assertEquals(c.getString("error"), e.kind, c.getString("name"))
            }
        }
    }

    @Test
    fun heartbeatVectors() {
        for (c in load("heartbeats.json")) {
            val body = c.getString("body").toByteArray()
            val expected = c.getJSONArray("error_paths").let { a -> (0 until a.length()).map { a.getString(it) } }
            if (c.getBoolean("valid")) {
                val parsed = JSONObject(validateHeartbeat(body))
                assertEquals(JSONObject(c.getString("body")).getString("instance_id"), parsed.getString("instance_id"))
            } else {
                val e = assertFailsWith<FleetException.Validation>(c.getString("name")) { validateHeartbeat(body) }
                assertEquals(expected, e.paths, c.getString("name"))
            }
        }
    }

    @Test
    fun manifestVectors() {
        for (c in load("manifests.json")) {
            val keys = c.getJSONArray("public_keys").let { a -> (0 until a.length()).map { a.getString(it) } }
            val hmac = if (c.isNull("hmac_secret")) null else c.getString("hmac_secret")
            val manifest = c.getJSONObject("manifest").toString()
            if (c.getBoolean("valid")) {
                assertEquals(c.getJSONObject("manifest").getString("version"), JSONObject(verifyManifest(manifest, keys, hmac)).getString("version"))
            } else {
                val e = assertFailsWith<FleetException.Manifest>(c.getString("name")) { verifyManifest(manifest, keys, hmac) }
                assertEquals(c.getString("error"), e.kind, c.getString("name"))
            }
        }
    }

    @Test
    fun badConfigurationIsAConfigError() {
        val e = assertFailsWith<FleetException.Config> { Verifier("""{"a":"","b":"visible-secret-value"}""", null, true) }
        assertTrue(!e.detail.contains("visible-secret-value"))
        val none = assertFailsWith<FleetException.Config> { Verifier(null, null, true) }
        assertTrue(none.detail.contains("CONTROL_PLANE_AGENT_SECRETS"))
    }
}
