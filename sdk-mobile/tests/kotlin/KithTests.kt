// The Kotlin bindings of the Kith SDK, run on the JVM with JNA against the built
// library and a real collector. The Rust test `tests/tests/kotlin_bindings.rs` compiles
// this file with kotlinc and runs each mode:
//
//   send      <url> <writeKey> <adminToken> <dataDir>  built-in HTTP; checks the admin API
//   transport <url> <writeKey> <adminToken> <dataDir>  a Kotlin Transport does the HTTP
//   capture   <dataDir> <count>                        captures offline, prints ids, waits to be killed
//   drain     <url> <writeKey> <dataDir>               delivers what a killed process left, prints stats
import dev.kith.sdk.Analytics
import dev.kith.sdk.AnalyticsConfig
import dev.kith.sdk.DeviceInfo
import dev.kith.sdk.KithException
import dev.kith.sdk.Transport
import dev.kith.sdk.UploadRequest
import dev.kith.sdk.UploadResponse
import java.net.HttpURLConnection
import java.net.URI
import java.net.http.HttpClient
import java.net.http.HttpRequest
import java.net.http.HttpResponse
import java.util.concurrent.atomic.AtomicInteger
import kotlin.system.exitProcess

fun device() = DeviceInfo(
    osName = "Android", osVersion = "14", manufacturer = "Google", model = "Pixel 8",
    deviceId = "kotlin-device", locale = "en-GB", timezone = "Europe/London",
    appName = "KithTests", appVersion = "3.1.0", appBuild = "310", appNamespace = "dev.kith.tests",
)

fun check(condition: Boolean, message: () -> String) {
    if (!condition) {
        System.err.println("FAILED: " + message().take(500))
        exitProcess(1)
    }
}

fun admin(url: String, token: String, path: String): String {
    val request = HttpRequest.newBuilder(URI.create(url + path)).header("Authorization", "Bearer $token").build()
    return HttpClient.newHttpClient().send(request, HttpResponse.BodyHandlers.ofString()).body()
}

/** Waits until the collector's pipeline has stored everything it accepted. */
fun caughtUp(url: String, token: String) {
    val deadline = System.currentTimeMillis() + 30_000
    while (!admin(url, token, "/v1/stats").contains("\"pending\":0")) {
        check(System.currentTimeMillis() < deadline) { "pipeline did not catch up" }
        Thread.sleep(10)
    }
}

/** The app's own HTTP stack, here HttpURLConnection; OkHttp in an Android app. */
class UrlConnectionTransport : Transport {
    val calls = AtomicInteger()

    override fun send(request: UploadRequest): UploadResponse {
        calls.incrementAndGet()
        return try {
            val connection = URI.create(request.url).toURL().openConnection() as HttpURLConnection
            connection.requestMethod = "POST"
            connection.doOutput = true
            connection.setRequestProperty("Authorization", request.authorization)
            connection.setRequestProperty("Content-Type", "application/json")
            connection.outputStream.use { it.write(request.body.toByteArray()) }
            val status = connection.responseCode
            val stream = if (status < 400) connection.inputStream else connection.errorStream
            val body = stream?.bufferedReader()?.use { it.readText() }
            val retryAfter = connection.getHeaderField("Retry-After")?.toULongOrNull()
            UploadResponse(status = status.toUShort(), retryAfterSecs = retryAfter, body = body)
        } catch (e: java.io.IOException) {
            UploadResponse(status = 0u, error = e.toString())
        }
    }
}

fun sendAndCheck(args: List<String>, transport: UrlConnectionTransport?) {
    val (url, writeKey, adminToken, dataDir) = args
    val analytics = Analytics(AnalyticsConfig(writeKey = writeKey, endpoint = url, dataDir = dataDir), device(), transport)
    analytics.onForeground()
    analytics.identify("kotlin-user", """{"email": "kim@example.com"}""")
    val order = analytics.track("Order Completed", """{"total": 19.99, "currency": "GBP"}""")
    analytics.screen("Basket", null)
    analytics.setPushToken("fcm", "fcm-token-kotlin")
    try {
        analytics.track("", null, null)
        check(false) { "an empty event name must throw" }
    } catch (e: KithException.InvalidEvent) {
        check(e.message!!.contains("missing_event")) { "clear error: ${e.message}" }
    }
    try {
        analytics.track("Bad", "[1]", null)
        check(false) { "a non-object must throw" }
    } catch (e: KithException.InvalidJson) {
    }
    analytics.onBackground()
    analytics.shutdown(10_000uL)
    val stats = analytics.stats()
    check(stats.captured == 7uL && stats.delivered == 7uL && stats.pending == 0uL) { "stats $stats" }
    caughtUp(url, adminToken)
    val stored = admin(url, adminToken, "/v1/events?message_id=$order")
    check(stored.contains("\"event\":\"Order Completed\"")) { "order not stored: $stored" }
    check(stored.contains("\"userId\":\"kotlin-user\"")) { "user id missing: $stored" }
    check(stored.contains("\"model\":\"Pixel 8\"")) { "device context missing: $stored" }
    val all = admin(url, adminToken, "/v1/events?user_id=kotlin-user")
    check(all.contains("\"event\":\"Application Backgrounded\"")) { "Application Backgrounded missing" }
    check(all.contains("\"token\":\"fcm-token-kotlin\"")) { "push token missing" }
    val anonymous = admin(url, adminToken, "/v1/events?anonymous_id=${analytics.anonymousId()}")
    for (name in listOf("Application Installed", "Application Opened")) {
        check(anonymous.contains("\"event\":\"$name\"")) { "$name missing" }
    }
    if (transport != null) {
        check(transport.calls.get() >= 1) { "the Kotlin transport was not used" }
    }
    println("OK ${stats.delivered} delivered")
}

fun main(argv: Array<String>) {
    val args = argv.drop(1)
    when (argv.firstOrNull()) {
        "send" -> sendAndCheck(args, null)
        "transport" -> sendAndCheck(args, UrlConnectionTransport())
        "capture" -> {
            val (dataDir, count) = args
            val analytics = Analytics(AnalyticsConfig(writeKey = "k", endpoint = "http://127.0.0.1:9", dataDir = dataDir), device(), null)
            repeat(count.toInt()) { i ->
                println(analytics.track("Offline Kotlin", """{"i": $i}""", null))
            }
            println("done")
            System.out.flush()
            Thread.sleep(3_600_000)
        }
        "drain" -> {
            val (url, writeKey, dataDir) = args
            val analytics = Analytics(AnalyticsConfig(writeKey = writeKey, endpoint = url, dataDir = dataDir), device(), null)
            analytics.shutdown(10_000uL)
            val stats = analytics.stats()
            println("pending=${stats.pending} delivered=${stats.delivered}")
        }
        else -> {
            System.err.println("usage: send|transport|capture|drain ...")
            exitProcess(2)
        }
    }
}
