"""Property tests of the import parsers: any input gives a value or a clear refusal, never a crash."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from carepost.patients import csvimport, fhir, imports, masking, service


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_date_parsers_never_crash(text):
    for value in (service.parse_date(text, None), service.parse_date(text, "%d.%m.%Y"), fhir.fhir_date(text)):
        assert value is None or value.year >= 1
    parsed = fhir.fhir_datetime(text)
    assert parsed is None or parsed.tzinfo is not None


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_format_detection_and_csv_preview_take_any_bytes(data):
    try:
        fmt = imports.detect_format(data)
        assert fmt in ("fhir", "ndjson", "csv")
    except fhir.FileFailure as exc:
        assert exc.field == "file"
    try:
        preview = csvimport.preview(data)
    except fhir.FileFailure as exc:
        assert exc.field == "file"
        return
    assert preview["delimiter"] in csvimport.DELIMITERS and preview["encoding"] in ("utf-8", "utf-8-sig", "cp1252", "latin-1")
    assert set(preview["suggested"]) <= set(preview["headers"])


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
                           max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["name", "telecom", "address", "birthDate", "gender", "identifier", "extension",
                                        "communication", "maritalStatus", "deceasedBoolean"]), json_values, max_size=6))
def test_patient_mapping_of_validated_shapes_never_crashes(patient):
    resource = {"resourceType": "Patient", **patient}
    try:
        fhir.validate_resource(resource)
    except fhir.MappingError as exc:
        assert exc.reason  # refused with a reason naming the element
        return
    mapped = fhir.map_patient(resource)
    assert isinstance(mapped, dict)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=60))
def test_references_and_masks_are_total(text):
    key = fhir.patient_ref_key(text)
    assert key is None or key[0] in ("source", "conditional")
    for fn in (masking.mask_name, masking.mask_email, masking.mask_phone, masking.mask_identifier):
        out = fn(text)
        assert out is None or out == "" or "***" in out or out == text == ""
