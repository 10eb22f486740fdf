"""The trust registry: the TOML of interface.md, clear errors, storage on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from locator.store.db import transaction
from locator.trusts import (
    TrustFileError,
    TrustRegistry,
    example_trusts,
    load_registry,
    parse_trusts_toml,
    store_trusts,
)

GOOD = """
[[trust]]
ods_code = "RAA01"
name = "Alpha"
hl7_sending_facilities = ["RAA01", "RAA01RIS"]
dicom_ae_titles = ["RAA01CT1"]
viewer_url = "https://pacs.raa01.example/iid?requestType=STUDY&studyUID={study_uid}"
viewer_url_by_accession = "https://pacs.raa01.example/iid?accessionNumber={accession}&pid={patient_id}"
dicomweb_url = "https://pacs.raa01.example/dicom-web/"
accession_system = "https://raa01.example/accession"
accession_field = "OBR-3"
timezone = "Europe/London"
mllp_port = 0
tls_client_names = ["ris.raa01.example"]
source_addresses = ["10.1.0.0/16"]

[[trust]]
ods_code = "RBB01"
name = "Beta"
hl7_sending_facilities = ["RBB01"]
viewer_url = "https://view.rbb01.example/{study_uid}"
dicomweb_url = "https://dw.rbb01.example"
"""


def test_a_full_trusts_file_parses_with_defaults() -> None:
    alpha, beta = parse_trusts_toml(GOOD)
    assert alpha.dicomweb_url == "https://pacs.raa01.example/dicom-web"
    assert (alpha.accession_field, alpha.mllp_port) == ("OBR-3", 0)
    assert alpha.allows_address("10.1.2.3") and not alpha.allows_address("10.2.0.1")
    assert beta.allows_address("192.0.2.1")  # no list: any address
    assert beta.accession_system == "urn:locator:accession:RBB01"
    assert (beta.accession_field, beta.timezone) == ("OBR-18", "Europe/London")


def test_viewer_links_are_filled_and_url_encoded() -> None:
    alpha, beta = parse_trusts_toml(GOOD)
    assert alpha.viewer_link(study_uid="1.2.3", accession="A 1") == (
        "https://pacs.raa01.example/iid?requestType=STUDY&studyUID=1.2.3"
    )
    assert alpha.viewer_link(study_uid=None, accession="A&1", patient_id="K/1") == (
        "https://pacs.raa01.example/iid?accessionNumber=A%261&pid=K%2F1"
    )
    assert alpha.viewer_link(study_uid=None, accession="A1") is None  # patient_id missing
    assert beta.viewer_link(study_uid=None, accession="A1") is None  # no accession template


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('hl7_sending_facilities = ["RBB01"]', 'hl7_sending_facilities = ["RAA01RIS"]'),
            "sending facility 'RAA01RIS' is claimed by both RAA01 and RBB01",
        ),
        (
            ('name = "Beta"', 'name = "Beta"\ndicom_ae_titles = ["RAA01CT1"]'),
            "AE title 'RAA01CT1' is claimed by both RAA01 and RBB01",
        ),
        (
            ('{study_uid}"\ndicomweb_url = "https://dw', '{studyuid}"\ndicomweb_url = "https://dw'),
            "viewer_url has unknown placeholder(s) studyuid",
        ),
        (('accession_field = "OBR-3"', 'accession_field = "OBR-19"'), "accession_field"),
        (('timezone = "Europe/London"', 'timezone = "Mars/Olympus"'), "unknown timezone"),
        (("mllp_port = 0", "mllp_port = 70000"), "mllp_port"),
        (
            ('source_addresses = ["10.1.0.0/16"]', 'source_addresses = ["10.1.0.0/33"]'),
            "source_addresses",
        ),
        (('ods_code = "RBB01"', 'ods_code = "RAA01"'), "defined twice"),
        (('name = "Beta"', 'name = "Beta"\nviewer_url_template = "x"'), "unknown key"),
        (('name = "Beta"\n', ""), "missing or empty name"),
    ],
)
def test_bad_files_get_clear_errors(change: tuple[str, str], message: str) -> None:
    bad = GOOD.replace(*change)
    assert bad != GOOD
    with pytest.raises(TrustFileError) as info:
        parse_trusts_toml(bad)
    assert message in str(info.value)


def test_not_toml_and_no_trusts() -> None:
    with pytest.raises(TrustFileError, match="not valid TOML"):
        parse_trusts_toml("[[trust]\n")
    with pytest.raises(TrustFileError, match=r"no \[\[trust\]\] tables"):
        parse_trusts_toml("title = 'x'\n")


def test_example_trusts_ship_with_the_package() -> None:
    trusts = example_trusts()
    assert [t.ods_code for t in trusts] == ["RZZ01", "RZZ02", "RZZ03"]


def test_store_and_load_the_registry(session_factory: sessionmaker[Session]) -> None:
    with transaction(session_factory) as session:
        store_trusts(session, trusts=parse_trusts_toml(GOOD))
    with session_factory() as session:
        registry = load_registry(session)
    assert isinstance(registry, TrustRegistry) and len(registry) == 2
    assert registry.by_facility("RAA01RIS").ods_code == "RAA01"  # type: ignore[union-attr]
    assert registry.by_ae_title("RAA01CT1 ").ods_code == "RAA01"  # type: ignore[union-attr]
    assert registry.by_tls_name("ris.raa01.example").ods_code == "RAA01"  # type: ignore[union-attr]
    assert registry.by_facility("NOPE") is None


def test_update_keeps_others_and_refuses_a_clash_with_a_stored_trust(
    session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    with transaction(session_factory) as session:
        store_trusts(session, trusts=parse_trusts_toml(GOOD))
    renamed = parse_trusts_toml(GOOD.replace('name = "Beta"', 'name = "Beta renamed"'))[1:]
    with transaction(session_factory) as session:
        store_trusts(session, trusts=renamed)
    with session_factory() as session:
        registry = load_registry(session)
    assert registry.get("RBB01").name == "Beta renamed"  # type: ignore[union-attr]
    assert registry.get("RAA01") is not None
    thief = [
        t
        for t in parse_trusts_toml(
            GOOD.replace(
                'hl7_sending_facilities = ["RBB01"]', 'hl7_sending_facilities = ["RAA01RIS"]'
            ).replace('"RAA01", "RAA01RIS"', '"RAA01"')
        )
        if t.ods_code == "RBB01"
    ]
    with (
        pytest.raises(TrustFileError, match="claimed by both RAA01 and RBB01"),
        transaction(session_factory) as session,
    ):
        store_trusts(session, trusts=thief)
