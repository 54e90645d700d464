//! The sender's console in a real browser: a console user the operator linked to a
//! message sender composes a message, picks a recipient list and the sender key file,
//! and the page signs the message in the browser (WebCrypto Ed25519) so the key never
//! reaches the server; the campaign page then shows its figures and charts. Pages are
//! checked at 390 and 1280 px, with screenshots (`HERALD_SCREENSHOTS=DIR` keeps them).
//!
//! Skips (and says so) when Chromium or chromedriver is not installed.

use std::time::Duration;

use herald_tests::browser::{self, Browser};
use herald_tests::receivers::HttpReceiver;
use herald_tests::{wait_until, TestServer};

const PASSWORD: &str = "correct horse battery";

#[test]
fn a_sender_composes_signs_in_the_browser_and_watches_the_campaign() {
    if !browser::installed() {
        println!("skipped: chromium and chromedriver are not installed");
        return;
    }
    let gateway = HttpReceiver::answering(200);
    let config = format!(
        "[forwarding]\nallow_http = true\n[sms]\nurl = {:?}\nbody = \"to={{to}}&text={{text}}\"\n",
        gateway.url("/sms")
    );
    let server = TestServer::start_with_config("sender-console", &config);
    let (key_file, _) = server.add_sender("card", false);
    let Some(b) = Browser::for_server(&server, "sender-console") else {
        return;
    };
    b.register("carla", PASSWORD);

    // Not linked yet: the sender pages are refused.
    let (status, _) = b.fetch("GET", "/sender");
    assert_eq!(status, 403, "a user not linked to a sender");
    server.cli_ok(&["sender", "link", "card", "--user", "carla"]);
    b.goto("/sender");
    b.wait_page("page-sender");
    assert!(
        b.try_find("#nav-sender").is_some(),
        "the sender link is in the menu"
    );
    b.shoot("sender-home");

    let list = server.dir.path().join("customers.csv");
    std::fs::write(
        &list,
        "phone,email\n010-1234-0001,\n010-1234-0002,\nnot a phone,\n",
    )
    .unwrap();

    // A key file that is not the sender's: the server refuses the signature.
    let wrong_key = server.dir.path().join("wrong.key");
    std::fs::write(&wrong_key, "11".repeat(32)).unwrap();
    b.click("#new-campaign");
    b.wait_page("page-sender-new");
    b.shoot("sender-new");
    let compose = |key: &std::path::Path| {
        b.fill_in("#compose", "title", "Your card was used");
        b.fill_in(
            "#compose",
            "body",
            "12,000 won at a bakery. Not you? Call us.",
        );
        b.fill_in("#compose", "country", "KR");
        b.fill_in("#compose", "fallback", "sms");
        b.attach("#list", &list);
        b.attach("#key", key);
        b.submit("#compose");
    };
    compose(&wrong_key);
    assert_eq!(b.page_id(), "page-sender-new");
    let error = b.body_text();
    assert!(error.contains("key"), "the refusal names the key: {error}");

    compose(&key_file);
    assert_eq!(
        b.page_id(),
        "page-sender-campaign",
        "the signed campaign was created: {}",
        b.body_text()
    );
    assert_eq!(
        b.text("#addressed"),
        "2",
        "two good rows; the bad one is left out"
    );
    // Nobody has the program: both get the SMS at once.
    let sms = gateway.wait_requests_blocking(2, Duration::from_secs(30));
    let texts: Vec<String> = sms
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert!(
        texts.iter().any(|t| t.contains("%2B821012340001")),
        "SMS to the first number: {texts:?}"
    );
    wait_until(
        "the page shows both fallbacks sent",
        Duration::from_secs(30),
        || {
            b.reload();
            b.text("#fallback-rate").contains("of 2").then_some(())
        },
    );
    assert!(
        b.try_find("#funnel rect").is_some(),
        "the funnel chart is drawn"
    );
    b.shoot("sender-campaign");
    b.goto("/sender");
    assert_eq!(b.find_all("#campaigns tbody tr").len(), 1);
    println!("screenshots in {}", b.screenshot_dir().display());
}
