"""The clinicians' page in a real browser, end to end (open mode, loopback).

`locator serve` runs as a subprocess on port 0 over an SQLite file; `locator demo`'s sample is
fed through its real MLLP and MPPS listeners; Debian chromium (Playwright, no browser download)
then uses the page the way a clinician would. Controls are found by their accessible names.
The expected values come from the demo's own sample data and the example trusts file, not
from the page.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from playwright.sync_api import Browser, Page, expect

from ingest.demo import (
    PATIENTS,
    RESULT_CANCELLED,
    DemoStudy,
    demo_nhs_number,
    demo_studies,
    run_demo,
)
from locator.core.nhs_number import check_digit, is_valid, normalise
from locator.trusts import TrustConfig, example_trusts
from tests.test_demo import ServeProcess, serve
from tests.test_web_support import (
    ARTIFACTS,
    focused,
    launch_browser,
    new_context,
    tab_until,
    watch,
)

pytestmark = pytest.mark.browser

TRUSTS: dict[str, TrustConfig] = {t.ods_code: t for t in example_trusts()}
MANY, FALL, _, _ = PATIENTS
RESULTS_HEADING = re.compile(r"^Imaging for NHS Number")


def studies_of(nhs: str) -> list[DemoStudy]:
    return [s for s in demo_studies() if s.patient.nhs_number == nhs]


def viewer_url(study: DemoStudy) -> str:
    trust = TRUSTS[study.ods]
    if study.reports == (RESULT_CANCELLED,):  # never performed: no Study UID was ever sent
        assert trust.viewer_url_by_accession is not None
        return trust.viewer_url_by_accession.replace("{accession}", study.accession)
    return trust.viewer_url.replace("{study_uid}", study.study_uid)


def source_url(study: DemoStudy) -> str:
    return f"{TRUSTS[study.ods].dicomweb_url}/studies/{study.study_uid}"


def spaced(nhs: str) -> str:
    return f"{nhs[:3]} {nhs[3:6]} {nhs[6:]}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch_browser()


@pytest.fixture(scope="module")
def service(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    with serve(tmp_path_factory.mktemp("web")) as running:
        result = run_demo(
            host="127.0.0.1", mllp_port=running.ports["mllp"], dicom_port=running.ports["dicom"],
            dicom_ae="LOCATOR", say=lambda _: None,
        )  # fmt: skip
        assert not result.messages_refused
        yield running


@pytest.fixture
def page(browser: Browser, service: ServeProcess) -> Iterator[Page]:
    context = new_context(browser)
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=service.base_url)
    tab = context.new_page()
    errors, _ = watch(tab)
    tab.goto(service.base_url + "/")
    yield tab
    context.close()
    assert not errors


def search(page: Page, typed: str) -> None:
    page.get_by_label("NHS Number").fill(typed)
    page.get_by_role("button", name="Search").click()
    expect(page.get_by_role("heading", name=RESULTS_HEADING)).to_be_visible()


def timeline(page: Page) -> list[str]:
    return page.locator("#timeline > li").all_inner_texts()


# --------------------------------------------------------------------------- finding a patient


def test_summary_timeline_view_and_source(page: Page, service: ServeProcess) -> None:
    _, urls = watch(page)
    studies = studies_of(FALL.nhs_number)
    search(page, spaced(FALL.nhs_number))

    expect(page.get_by_role("heading", name=RESULTS_HEADING)).to_have_text(
        f"Imaging for NHS Number {spaced(FALL.nhs_number)}"
    )
    imaged = [s for s in studies if s.reports != (RESULT_CANCELLED,)]
    last = max(imaged, key=lambda s: s.started)
    lead = page.locator("#summary-lead")
    expect(lead).to_contain_text(f"Last imaged at {TRUSTS[last.ods].name}")
    expect(lead).to_contain_text(f"{last.started.day} {last.started:%B %Y}")
    expect(lead).to_contain_text(last.procedure[1])
    cards = page.locator("#summary > li")
    expect(cards).to_have_count(len({s.ods for s in studies}))
    for ods in {s.ods for s in studies}:
        expect(cards.filter(has_text=TRUSTS[ods].name)).to_have_count(1)

    items = page.locator("#timeline > li")
    expect(items).to_have_count(len(studies))
    ct_head = next(s for s in studies if s.procedure[1] == "CT Head")
    item = items.filter(has_text="CT Head")
    for text in ("CT", TRUSTS["RZZ01"].name, "Images available", "Final report", ct_head.accession):
        expect(item).to_contain_text(text)
    shown = item.locator("time").get_attribute("datetime")
    assert shown is not None and datetime.fromisoformat(shown) == ct_head.started.astimezone(UTC)
    expect(items.filter(has_text="MR Knee Lt")).to_contain_text("Cancelled")
    expect(items.filter(has_text="US Abdomen")).to_contain_text("Registered")
    expect(items.filter(has_text="XR Chest")).to_contain_text("Preliminary report")

    expect(cards.filter(has_text=TRUSTS["RZZ02"].name)).to_contain_text("Also 1 cancelled study")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "clinician-page.png"), full_page=True)

    view = page.get_by_role("link", name=re.compile(r"^View CT Head"))
    expect(view).to_have_attribute("href", viewer_url(ct_head))
    expect(view).to_have_attribute("target", "_blank")
    assert "noopener" in (view.get_attribute("rel") or "").split()
    with page.expect_popup() as popup:
        view.click()
    assert popup.value.url == viewer_url(ct_head)
    popup.value.close()

    source = page.get_by_role("textbox", name=re.compile(r"^Source DICOMweb address for CT Head"))
    expect(source).to_have_value(source_url(ct_head))
    page.get_by_role("button", name=re.compile(r"^Copy DICOMweb address for CT Head")).click()
    expect(page.locator("#copy-status")).to_have_text("DICOMweb address copied to the clipboard")
    assert page.evaluate("navigator.clipboard.readText()") == source_url(ct_head)

    assert FALL.nhs_number not in page.url
    assert not [u for u in urls if FALL.nhs_number in u]


def test_invalid_numbers_are_explained_as_typed_and_never_searched(page: Page) -> None:
    _, urls = watch(page)
    box = page.get_by_label("NHS Number")
    error = page.locator("#nhs-error")
    wrong_check = FALL.nhs_number[:9] + str((int(FALL.nhs_number[9]) + 1) % 10)

    box.fill(spaced(wrong_check))
    expect(error).to_contain_text("not a valid NHS Number")
    expect(box).to_have_attribute("aria-invalid", "true")
    box.fill("999 000 00x8")
    expect(error).to_contain_text("only contain numbers")
    box.fill("999 000 001")
    expect(error).to_be_empty()  # still typing: no complaint yet
    box.press("Enter")
    expect(error).to_contain_text("10 digits. You have entered 9")
    box.fill("")
    page.get_by_role("button", name="Search").click()
    expect(error).to_contain_text("Enter an NHS Number")
    box.fill("1111111111")  # passes the check digit, but a placeholder
    expect(error).to_contain_text("not a valid NHS Number")
    box.press("Enter")
    assert not [u for u in urls if "/fhir/" in u]

    box.fill(spaced(FALL.nhs_number))
    expect(error).to_be_empty()
    expect(box).to_have_attribute("aria-invalid", "false")
    expect(page.locator("#nhs-valid")).to_have_text("✓ Valid NHS Number")


def candidate_numbers() -> list[str]:
    """Valid and invalid NHS Numbers as a clinician might type or paste them."""
    valid = [demo_nhs_number(n) for n in range(6)] + ["4857773456", "9434765919"]
    no_check_digit = next(  # a first nine whose modulus-11 check comes out as 10
        f"999{n:06d}" for n in range(1000) if check_digit(f"999{n:06d}") is None
    )
    wrong = [v[:9] + str((int(v[9]) + d) % 10) for v in valid[:3] for d in (1, 5)]
    shaped = ["943 476 5919", "943-476-5919", " 9434765919 ", "943 476 59 19"]
    return [
        *valid, *wrong, *shaped, no_check_digit + "0", no_check_digit + "1", "0000000000",
        "9999999999", "94347659190", "943476591", "94347659a9", "943.476.5919",
    ]  # fmt: skip


def test_typed_check_agrees_with_the_service_check(page: Page) -> None:
    box = page.get_by_label("NHS Number")
    for candidate in candidate_numbers():
        box.fill(candidate)
        shown_valid = page.locator("#nhs-valid").inner_text() != ""
        assert shown_valid == is_valid(candidate), candidate
        digits = normalise(candidate)
        complaint = not shown_valid and (len(digits) >= 10 or not digits.isdigit())
        assert (box.get_attribute("aria-invalid") == "true") == complaint, candidate


def test_paging_through_a_patient_with_many_studies(page: Page) -> None:
    _, urls = watch(page)
    studies = studies_of(MANY.nhs_number)
    assert len(studies) > 20
    search(page, MANY.nhs_number)
    items = page.locator("#timeline > li")
    expect(items).to_have_count(20)
    expect(page.locator("#summary-note")).to_contain_text("20 most recent studies")
    expect(page.locator("#results-count")).to_have_text(
        "20 most recent studies shown, older ones available, newest first."
    )
    more = page.get_by_role("button", name="Show older studies")
    more.click()
    expect(items).to_have_count(len(studies))
    expect(more).to_be_hidden()
    expect(page.locator("#results-count")).to_have_text(
        f"{len(studies)} studies found, newest first."
    )
    expect(page.locator("#summary-note")).to_be_hidden()

    cursor_requests = [u for u in urls if "_cursor=" in u]
    assert len(cursor_requests) == 1 and MANY.nhs_number not in cursor_requests[0]
    shown = [t for t in page.locator("#timeline time[datetime]").evaluate_all(
        "els => els.map(e => e.dateTime)")]  # fmt: skip
    expected = sorted(
        (s.started.astimezone(UTC) for s in studies if s.reports != (RESULT_CANCELLED,)),
        reverse=True,
    )
    assert [datetime.fromisoformat(t) for t in shown] == expected
    hrefs = page.get_by_role("link", name=re.compile(r"^View ")).evaluate_all(
        "els => els.map(e => e.href)"
    )
    assert sorted(hrefs) == sorted(viewer_url(s) for s in studies)
    for ods in {s.ods for s in studies}:
        counts = Counter(
            s.modality for s in studies if s.ods == ods and s.reports != (RESULT_CANCELLED,)
        )
        card = page.locator("#summary > li").filter(has_text=TRUSTS[ods].name)
        for modality, count in counts.items():
            expect(card).to_contain_text(f"{modality} {count}")


def test_keyboard_alone(page: Page) -> None:
    tab_until(page, "el.id === 'nhs-number'")
    page.keyboard.type(FALL.nhs_number)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name=RESULTS_HEADING)).to_be_focused()
    ct_head = next(s for s in studies_of(FALL.nhs_number) if s.procedure[1] == "CT Head")
    tab_until(page, "el.tagName === 'A' && el.textContent.startsWith('View CT Head')")
    with page.expect_popup() as popup:
        page.keyboard.press("Enter")
    assert popup.value.url == viewer_url(ct_head)
    popup.value.close()
    page.keyboard.press("Tab")
    assert focused(page, "el.value") == source_url(ct_head)
    page.keyboard.press("Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#copy-status")).to_contain_text("copied")

    tab_until(page, "el.id === 'nhs-number'", limit=200)
    page.keyboard.press("Control+A")
    page.keyboard.type(spaced(MANY.nhs_number))
    page.keyboard.press("Enter")
    expect(page.locator("#timeline > li")).to_have_count(20)
    tab_until(page, "el.id === 'more-button'", limit=200)
    page.keyboard.press("Enter")
    expect(page.locator("#timeline > li")).to_have_count(len(studies_of(MANY.nhs_number)))
    assert focused(page, "el.tagName + ':' + el.className") == "LI:study"
    assert focused(page, "[...el.parentNode.children].indexOf(el)") == "20"
    page.keyboard.press("Tab")
    assert focused(page, "el.textContent").startswith("View")


def test_empty_and_error_states(page: Page) -> None:
    unknown = demo_nhs_number(40)
    page.get_by_label("NHS Number").fill(unknown)
    page.get_by_role("button", name="Search").click()
    status = page.get_by_role("status").filter(has_text="No imaging found")
    expect(status).to_contain_text(f"No imaging found for NHS Number {spaced(unknown)}")
    expect(page.locator("#results")).to_be_hidden()

    search(page, FALL.nhs_number)  # a previous result is cleared by a failed search
    page.route("**/fhir/ImagingStudy/_search", lambda route: route.abort())
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#status")).to_contain_text("The locator could not be reached")
    expect(page.locator("#results")).to_be_hidden()
    page.unroute("**/fhir/ImagingStudy/_search")
    page.route(
        "**/fhir/ImagingStudy/_search",
        lambda route: route.fulfill(
            status=500, content_type="application/fhir+json",
            headers={"X-Request-ID": "req-123"},
            body='{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"exception"}]}',
        ),
    )  # fmt: skip
    page.get_by_role("button", name="Search").click()
    expect(page.locator("#status")).to_contain_text("there is a problem with the locator")
    expect(page.locator("#status")).to_contain_text("req-123")


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (768, 1024), (390, 844)])
def test_readable_on_ward_pc_tablet_and_phone(
    browser: Browser, service: ServeProcess, width: int, height: int
) -> None:
    context = new_context(browser, width, height)
    page = context.new_page()
    page.goto(service.base_url + "/")
    search(page, FALL.nhs_number)
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    for control in (
        page.get_by_role("button", name="Search"),
        page.get_by_role("link", name=re.compile(r"^View CT Head")),
        page.get_by_role("button", name=re.compile(r"^Copy DICOMweb address for CT Head")),
    ):
        box = control.bounding_box()
        assert box is not None and box["height"] >= 44 and box["width"] >= 44
    context.close()


def test_page_and_its_files_are_served_locally(page: Page, service: ServeProcess) -> None:
    _, urls = watch(page)
    page.reload()
    expect(page.get_by_label("NHS Number")).to_be_visible()
    assert urls and all(u.startswith(service.base_url) for u in urls)
    for name in ("app.js", "style.css"):
        assert page.request.get(f"{service.base_url}/{name}").ok
    headers = page.request.get(f"{service.base_url}/").headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["referrer-policy"] == "no-referrer"
