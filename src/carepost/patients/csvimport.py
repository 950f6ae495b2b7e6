"""CSV import from practice-management and CRM exports: saved column mappings, header detection,
delimiter sniffing, encodings (UTF-8 with or without BOM, Windows-1252, Latin-1), type conversion,
date formats, and per-row errors with line numbers.

Each row is one contact, saved in its own savepoint (an invalid row leaves nothing behind) and
matched by its external id or MRN, so importing the same file again updates instead of
duplicating. Rows are committed in batches.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from collections.abc import Callable, Iterator
from typing import IO, Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from carepost.core.errors import CarePostError, Conflict, NotFound, ValidationFailed
from carepost.core.ids import is_id
from carepost.patients import service
from carepost.patients.fhir import ErrorSink, FileFailure, ImportStats
from carepost.patients.models import CsvMapping
from carepost.patients.schemas import ContactIn, CsvMappingIn

BATCH_ROWS = 500
SAMPLE_BYTES = 64 * 1024
DELIMITERS = ",;\t|"

# CarePost fields a column can map to (plus ``attributes.<key>`` and ``ignore``).
CONTACT_FIELDS = (
    "external_id", "mrn", "name_prefix", "given_name", "middle_name", "family_name", "name_suffix", "full_name",
    "email", "email2", "phone", "mobile_phone", "work_phone", "address_line1", "address_line2", "city", "state",
    "postal_code", "country", "birth_date", "sex", "gender_identity", "preferred_language", "time_zone", "ethnicity",
    "race", "marital_status", "education", "employment_status", "household_status", "income_band", "coverage_type",
    "coverage_plan", "religion", "deceased", "care_stage", "ssn", "drivers_license", "passport",
)

# Header spellings seen in exports, normalized (lowercase, letters and digits only).
ALIASES = {
    "external_id": ["externalid", "patientid", "accountnumber", "accountno", "acctno", "account", "chartnumber", "customerid",
                    "memberid", "personid", "id", "patientnumber", "patientno"],
    "mrn": ["mrn", "medicalrecordnumber", "medicalrecordno", "mrno"],
    "name_prefix": ["prefix", "title", "salutation"],
    "given_name": ["givenname", "firstname", "first", "fname", "patientfirstname", "forename"],
    "middle_name": ["middlename", "middle", "mi", "middleinitial"],
    "family_name": ["familyname", "lastname", "last", "lname", "surname", "patientlastname"],
    "name_suffix": ["suffix"],
    "full_name": ["name", "fullname", "patientname"],
    "email": ["email", "emailaddress", "email1", "primaryemail", "patientemail", "mail"],
    "email2": ["email2", "secondaryemail", "alternateemail"],
    "phone": ["phone", "phonenumber", "homephone", "telephone", "tel", "primaryphone"],
    "mobile_phone": ["mobile", "mobilephone", "cell", "cellphone", "cellphonenumber"],
    "work_phone": ["workphone", "businessphone"],
    "address_line1": ["address", "address1", "addressline1", "street", "streetaddress", "addr1"],
    "address_line2": ["address2", "addressline2", "addr2", "apt", "suite"],
    "city": ["city", "town"],
    "state": ["state", "st", "province", "region"],
    "postal_code": ["zip", "zipcode", "postalcode", "postcode", "zip5"],
    "country": ["country", "countrycode"],
    "birth_date": ["birthdate", "dob", "dateofbirth", "birthday", "patientdob"],
    "sex": ["sex", "gender", "administrativegender", "birthsex"],
    "gender_identity": ["genderidentity"],
    "preferred_language": ["language", "preferredlanguage", "lang"],
    "time_zone": ["timezone", "tz"],
    "ethnicity": ["ethnicity"],
    "race": ["race"],
    "marital_status": ["maritalstatus", "marital"],
    "education": ["education", "educationlevel"],
    "employment_status": ["employment", "employmentstatus"],
    "household_status": ["household", "householdstatus", "familystatus"],
    "income_band": ["income", "incomeband", "incomerange"],
    "coverage_type": ["insurancetype", "coveragetype", "payertype", "financialclass"],
    "coverage_plan": ["insuranceplan", "plan", "planname", "insurance", "primaryinsurance", "payer", "payor"],
    "religion": ["religion", "religiousaffiliation"],
    "deceased": ["deceased", "isdeceased"],
    "care_stage": ["carestage", "stage"],
    # government identifiers: recognized so they can be left out (minimum necessary), stored only
    # when the organization keeps their system (identifier_policy)
    "ssn": ["ssn", "socialsecuritynumber", "socialsecurityno", "socialsecurity", "ss"],
    "drivers_license": ["driverslicense", "driverslicence", "driverslicensenumber", "dl", "dlnumber", "licensenumber"],
    "passport": ["passport", "passportnumber", "passportno"],
}
_ALIAS_INDEX = {alias: fieldname for fieldname, aliases in ALIASES.items() for alias in aliases}
_SEX = {"f": "female", "female": "female", "w": "female", "woman": "female", "m": "male", "male": "male", "man": "male",
        "o": "other", "other": "other", "x": "other", "u": "unknown", "unknown": "unknown", "unk": "unknown"}


def _norm_header(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def suggest_mapping(headers: list[str]) -> dict[str, str]:
    """header -> field for the headers CarePost recognizes; each field used once."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for h in headers:
        fieldname = _ALIAS_INDEX.get(_norm_header(h))
        if fieldname and fieldname not in used:
            out[h] = fieldname
            used.add(fieldname)
    return out


def valid_target(target: str, attribute_keys: set[str] | None = None) -> bool:
    if target in CONTACT_FIELDS or target == "ignore":
        return True
    if target.startswith("attributes."):
        return attribute_keys is None or target.split(".", 1)[1] in attribute_keys
    return False


# --------------------------------------------------------------------------- saved mappings


def create_mapping(session: Session, org_id: str, data: CsvMappingIn) -> CsvMapping:
    keys = {d.key for d in service.list_attribute_definitions(session, org_id)}
    for header, target in data.columns.items():
        if not valid_target(target, keys):
            raise ValidationFailed("Unknown CarePost field for this column.", field=f"columns.{header}"[:200])
    if not ({"external_id", "mrn"} & set(data.columns.values())):
        raise ValidationFailed("Map a column to external_id or mrn, so importing the file again updates contacts "
                               "instead of adding them twice.", field="columns")
    if session.scalar(select(CsvMapping.id).where(CsvMapping.org_id == org_id, CsvMapping.name == data.name)):
        raise Conflict("A mapping with this name exists.", field="name")
    options = data.model_dump(exclude={"name", "columns"}, exclude_none=True)
    mapping = CsvMapping(org_id=org_id, name=data.name, columns=dict(data.columns), options=options)
    session.add(mapping)
    session.flush()
    return mapping


def get_mapping(session: Session, mapping_id: str) -> CsvMapping:
    mapping = session.get(CsvMapping, mapping_id) if is_id(mapping_id or "") else None
    if mapping is None or (session.info.get("org_id") and mapping.org_id != session.info["org_id"]):
        raise NotFound("No such CSV mapping.", field="mapping_id")
    return mapping


def list_mappings(session: Session, org_id: str) -> list[CsvMapping]:
    return list(session.scalars(select(CsvMapping).where(CsvMapping.org_id == org_id).order_by(CsvMapping.name)))


def mapping_dict(m: CsvMapping) -> dict:
    return {"id": m.id, "name": m.name, "columns": m.columns, "options": m.options}


# --------------------------------------------------------------------------- sniffing


def detect_encoding(sample: bytes, declared: str | None = None) -> str:
    if declared:
        return declared
    if sample.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        decoder.decode(sample, final=False)  # a character cut at the sample's end is not an error
        return "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        sample.decode("cp1252")
        return "cp1252"
    except UnicodeDecodeError:
        return "latin-1"


def detect_delimiter(text: str, declared: str | None = None) -> str:
    if declared:
        return declared
    lines = [ln for ln in text.splitlines()[:50] if ln.strip()]
    if not lines:
        return ","
    try:
        return csv.Sniffer().sniff("\n".join(lines), delimiters=DELIMITERS).delimiter
    except csv.Error:
        counts = {d: lines[0].count(d) for d in DELIMITERS}
        best = max(counts, key=counts.get)
        return best if counts[best] else ","


def preview(head: bytes, options: dict | None = None) -> dict:
    """What the import wizard shows before a mapping is chosen: the parsing options CarePost
    detected, the headers and a suggested mapping. No cell values (they are PHI)."""
    options = options or {}
    encoding = detect_encoding(head, options.get("encoding"))
    text = head.decode(encoding, errors="replace")
    delimiter = detect_delimiter(text, options.get("delimiter"))
    try:
        first = next(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter), [])
    except csv.Error:
        raise FileFailure("The start of the file is not readable as CSV.", field="file") from None
    has_header = options.get("has_header")
    if has_header is None:
        has_header = bool(suggest_mapping(first)) or _sniff_header(text)
    headers = [h.strip() for h in first] if has_header else [str(i + 1) for i in range(len(first))]
    return {"encoding": encoding, "delimiter": delimiter, "has_header": has_header, "headers": headers,
            "suggested": suggest_mapping(headers) if has_header else {}, "columns": len(first)}


def _sniff_header(text: str) -> bool:
    try:
        return csv.Sniffer().has_header(text[:8192])
    except csv.Error:
        return True


# --------------------------------------------------------------------------- the importer


class CsvImporter:
    """Imports one CSV file into contacts. Commits every ``BATCH_ROWS`` rows (documented: a long
    import must not hold SQLite's write lock, and progress must be visible)."""

    def __init__(self, session: Session, org_id: str, run_id: str, sink: ErrorSink, *, mapping: CsvMapping | None = None,
                 options: dict | None = None):
        self.session = session
        self.org_id = org_id
        self.run_id = run_id
        self.sink = sink
        self.columns: dict[str, str] | None = dict(mapping.columns) if mapping else None
        self.options = {**(mapping.options if mapping else {}), **(options or {})}
        if "columns" in self.options and self.columns is None:
            self.columns = dict(self.options["columns"])
        self.stats = ImportStats()
        self.bad_lines: set[int] = set()

    def run(self, opener: Callable[[], IO[bytes]]) -> ImportStats:
        with opener() as f:
            sample = f.read(SAMPLE_BYTES)
        encoding = detect_encoding(sample, self.options.get("encoding"))
        delimiter = detect_delimiter(sample.decode(encoding, errors="replace"), self.options.get("delimiter"))
        date_format = self.options.get("date_format") or None
        with opener() as f:
            reader = csv.reader(self._lines(f, encoding), delimiter=delimiter, strict=False)
            try:
                header_row = next(reader, None)
            except csv.Error:
                raise FileFailure("The first line is not readable as CSV (check quoting and the delimiter).", field="file") from None
            if header_row is None:
                raise FileFailure("The file is empty.", field="file")
            has_header = self.options.get("has_header")
            if has_header is None:
                has_header = bool(suggest_mapping(header_row)) or self.columns is not None and any(h.strip() in self.columns for h in header_row)
            headers = [h.strip() for h in header_row] if has_header else [str(i + 1) for i in range(len(header_row))]
            columns = self._resolve_columns(headers, delimiter)
            if not has_header:
                self._row(reader.line_num, header_row, headers, columns, date_format)
            while True:
                start = reader.line_num + 1
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error:
                    self._fail(start, None, "The line is not valid CSV (check quoting and the delimiter).")
                    continue
                if not any(cell.strip() for cell in row):
                    continue
                self._row(start, row, headers, columns, date_format)
                if self.stats.processed % BATCH_ROWS == 0:
                    self._commit()
        self._commit()
        return self.stats

    def _lines(self, f: IO[bytes], encoding: str) -> Iterator[str]:
        """Decode line by line, so one badly encoded line fails alone instead of the file."""
        codec = "utf-8" if encoding == "utf-8-sig" else encoding
        for n, raw in enumerate(f, start=1):
            if n == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield raw.decode(codec)
            except UnicodeDecodeError:
                self.bad_lines.add(n)
                yield raw.decode(codec, errors="replace")

    def _resolve_columns(self, headers: list[str], delimiter: str) -> dict[int, str]:
        mapping = self.columns if self.columns is not None else suggest_mapping(headers)
        keys = {d.key for d in service.list_attribute_definitions(self.session, self.org_id)}
        resolved: dict[int, str] = {}
        for i, h in enumerate(headers):
            target = mapping.get(h) or mapping.get(str(i + 1))
            if target and target != "ignore":
                if not valid_target(target, keys):
                    raise FileFailure(f"Column {h[:60]!r} maps to an unknown field.", field="mapping")
                resolved[i] = target
        if len(headers) == 1 and len(mapping) > 1:
            raise FileFailure(f"Only one column found when splitting on {delimiter!r}: set the delimiter of this file.", field="delimiter")
        missing = [h for h in mapping if mapping[h] != "ignore" and h not in headers and not (h.isdigit() and int(h) <= len(headers))]
        if missing:
            raise FileFailure("The file has no column " + ", ".join(repr(m[:60]) for m in missing[:5]) + " named by the mapping.", field="mapping")
        if not ({"external_id", "mrn"} & set(resolved.values())):
            raise FileFailure("No column maps to external_id or mrn; CarePost needs one to update contacts on re-import "
                              "instead of adding them twice.", field="mapping")
        self.stats.by_type.setdefault("ignored_columns", {})
        for i, h in enumerate(headers):
            if i not in resolved:
                self.stats.by_type["ignored_columns"][h[:60]] = 1
        return resolved

    def _row(self, line: int, row: list[str], headers: list[str], columns: dict[int, str], date_format: str | None) -> None:
        last_line = line + sum(cell.count("\n") for cell in row)
        if any(n in self.bad_lines for n in range(line, last_line + 1)):
            return self._fail(line, None, f"The line is not valid {self.options.get('encoding') or 'UTF-8'}; set the file's encoding.")
        if len(row) > len(headers):
            extra = row[len(headers):]
            if any(c.strip() for c in extra):
                return self._fail(line, None, f"The row has {len(row)} cells but the header has {len(headers)}.")
        try:
            data, column_of = self._convert(row, headers, columns, date_format)
            fields = ContactIn.model_validate(data).model_dump(exclude_unset=True)
        except _CellError as exc:
            return self._fail(line, exc.column, exc.reason)
        except ValidationError as exc:
            err = exc.errors(include_input=False, include_url=False)[0]
            target = str(err["loc"][0]) if err.get("loc") else None
            return self._fail(line, column_of.get(target, target), str(err.get("msg", "invalid")).replace("Value error, ", ""))
        try:
            with self.session.begin_nested():
                result = service.save_contact(self.session, self.org_id, fields, source="csv", import_id=self.run_id)
                self.session.flush()
        except CarePostError as exc:
            target = (exc.field or "").split(".")[0]
            return self._fail(line, column_of.get(target, exc.field), exc.message)
        self.stats.add("Contact", "created" if result.created else "updated")
        self.stats.identifiers_not_kept += result.identifiers_not_kept

    def _convert(self, row: list[str], headers: list[str], columns: dict[int, str], date_format: str | None) -> tuple[dict, dict]:
        data: dict[str, Any] = {}
        column_of: dict[str, str] = {}
        phones = []
        emails = []
        for i, target in columns.items():
            value = row[i].strip() if i < len(row) else ""
            header = headers[i]
            if not value:
                continue
            fieldname = target.split(".", 1)[0]
            column_of.setdefault(fieldname, header)
            if target == "birth_date":
                parsed = service.parse_date(value, date_format)
                if parsed is None:
                    raise _CellError(header, "Not a date" + (f" in the format {date_format}." if date_format else " CarePost recognizes (use YYYY-MM-DD or MM/DD/YYYY)."))
                data["birth_date"] = parsed
            elif target == "sex":
                sex = _SEX.get(value.lower())
                if sex is None:
                    raise _CellError(header, "Expected F, M, other or unknown.")
                data["sex"] = sex
            elif target == "deceased":
                text = value.lower()
                if text not in service._TRUE | service._FALSE:
                    raise _CellError(header, "Expected yes or no.")
                data["deceased"] = text in service._TRUE
            elif target in ("email", "email2"):
                emails.append(value)
                column_of.setdefault("emails", header)
            elif target in ("phone", "mobile_phone", "work_phone"):
                phones.append({"value": value, "use": {"mobile_phone": "mobile", "work_phone": "work"}.get(target, "home")})
                column_of.setdefault("phones", header)
            elif target == "full_name":
                given, family = _split_name(value)
                data.setdefault("given_name", given)
                data.setdefault("family_name", family)
            elif target.startswith("attributes."):
                data.setdefault("attributes", {})[target.split(".", 1)[1]] = value
            elif target == "postal_code":
                data["postal_code"] = value.zfill(5) if value.isdigit() and len(value) < 5 else value
            elif target in service.GOVERNMENT_COLUMNS:
                system, type_code = service.GOVERNMENT_COLUMNS[target]
                data.setdefault("identifiers", []).append({"system": system, "value": value[:200], "type": type_code})
                column_of.setdefault("identifiers", header)
            else:
                data[target] = value
        if emails:
            data["emails"] = emails
        if phones:
            data["phones"] = phones
        if "mrn" in data and self.options.get("mrn_system"):
            data["mrn_system"] = self.options["mrn_system"]
        if "external_id" in data and self.options.get("identifier_system"):
            data["external_id_system"] = self.options["identifier_system"]
        if not data.get("external_id") and not data.get("mrn"):
            raise _CellError(next((headers[i] for i, t in columns.items() if t in ("external_id", "mrn")), None),
                             "The row has no external id or MRN.")
        return data, column_of

    def _fail(self, line: int, column: str | None, reason: str) -> None:
        self.stats.add("Contact", "failed")
        self.sink.error(reason=reason[:500], line=line, field=column)

    def _commit(self) -> None:
        self.sink.checkpoint(self.stats)
        self.session.commit()


class _CellError(Exception):
    def __init__(self, column: str | None, reason: str):
        super().__init__(reason)
        self.column = column
        self.reason = reason


def _split_name(value: str) -> tuple[str | None, str | None]:
    if "," in value:
        family, _, given = value.partition(",")
        return given.strip() or None, family.strip() or None
    parts = value.split()
    if len(parts) == 1:
        return parts[0], None
    return " ".join(parts[:-1]), parts[-1]
