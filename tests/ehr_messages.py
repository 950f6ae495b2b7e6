"""HL7 v2 test messages written for CarePost's tests (ADT A01-A13, SIU S12-S26) and a
small MLLP client. Synthetic patients only."""

from __future__ import annotations

import socket
import ssl
from datetime import UTC, datetime, timedelta

START, END = b"\x0b", b"\x1c\r"


def ts(delta: timedelta = timedelta(0)) -> str:
    return (datetime.now(UTC) + delta).strftime("%Y%m%d%H%M%S") + "+0000"


def msh(token: str, trigger: str, control_id: str, *, facility: str = "NORTHCLINIC", message_type: str = "ADT",
        version: str = "2.5.1") -> str:
    structure = {"A01": "ADT_A01", "A02": "ADT_A02", "A03": "ADT_A03", "A04": "ADT_A01", "A05": "ADT_A05",
                 "A08": "ADT_A01", "A11": "ADT_A09", "A13": "ADT_A01", "A40": "ADT_A39"}.get(trigger, "SIU_S12")
    return (f"MSH|^~\\&|EPICADT|{facility}^2.16.840.1.113883.19.5^ISO|CAREPOST|CAREPOST|{ts()}|{token}|"
            f"{message_type}^{trigger}^{structure}|{control_id}|P|{version}")


def pid(mrn: str, *, extra_ids: str = "") -> str:
    ids = f"{mrn}^^^NORTH^MR" + (f"~{extra_ids}" if extra_ids else "")
    return f"PID|1||{ids}||Testpatient^Ann^Q||19800101|F|||1 Main St^^Springfield^IL^62701||^PRN^PH^^^217^5550100"


def adt(token: str, trigger: str, control_id: str, mrn: str, *, patient_class: str = "I",
        facility: str = "NORTHCLINIC") -> str:
    admitted = ts(timedelta(hours=-30))
    discharged = ts(timedelta(hours=-1)) if trigger == "A03" else ""
    segments = [
        msh(token, trigger, control_id, facility=facility),
        f"EVN|{trigger}|{ts(timedelta(minutes=-5))}",
        pid(mrn),
        f"PV1|1|{patient_class}|4W^401^B^NORTHHOSP||||1234567^Carter^Maya^^^DR|7654321^Ng^Lee|||MED|||||||||"
        f"||||||||||||||||||||||||{admitted}|{discharged}",
    ]
    return "\r".join(segments) + "\r"


def merge(token: str, control_id: str, mrn: str, prior_mrn: str | None) -> str:
    """ADT^A40: the patient of ``prior_mrn`` (MRG-1) merged into the patient of ``mrn`` (PID-3)."""
    segments = [msh(token, "A40", control_id), f"EVN|A40|{ts(timedelta(minutes=-5))}", pid(mrn)]
    if prior_mrn is not None:
        segments.append(f"MRG|{prior_mrn}^^^NORTH^MR")
    return "\r".join(segments) + "\r"


def siu(token: str, trigger: str, control_id: str, mrn: str, *, appointment_id: str = "APT1001",
        start: datetime | None = None, facility: str = "NORTHCLINIC") -> str:
    start = start or (datetime.now(UTC) + timedelta(days=3)).replace(hour=15, minute=30, second=0, microsecond=0)
    begin = start.strftime("%Y%m%d%H%M%S") + "+0000"
    end = (start + timedelta(minutes=20)).strftime("%Y%m%d%H%M%S") + "+0000"
    status = {"S15": "Cancelled"}.get(trigger, "Booked")
    segments = [
        msh(token, trigger, control_id, facility=facility, message_type="SIU"),
        f"SCH|PL{appointment_id}|{appointment_id}|||||ROUTINE^Routine visit^HL70276|FOLLOWUP^Follow-up visit|20|min|"
        f"^^20^{begin}^{end}" + "|" * 14 + status,
        "TQ1|1||||||" + begin + "|" + end,
        pid(mrn),
        "RGS|1|A",
        "AIS|1|A|99213^Office visit^CPT|" + begin + "|||20|min",
        "AIL|1|A|CLINIC2^205^^NORTHCLINIC",
        "AIP|1|A|1234567^Carter^Maya^^^DR|ATT",
    ]
    return "\r".join(segments) + "\r"


class MllpClient:
    """One MLLP connection: send a frame, read the answer's frame."""

    def __init__(self, port: int, *, tls: ssl.SSLContext | None = None, timeout: float = 30):
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = tls.wrap_socket(raw, server_hostname="localhost") if tls else raw
        self.buffer = b""

    def send(self, message: str | bytes) -> None:
        data = message.encode() if isinstance(message, str) else message
        self.sock.sendall(START + data + END)

    def receive(self) -> str:
        while END not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the listener closed the connection")
            self.buffer += chunk
        frame, _, self.buffer = self.buffer.partition(END)
        assert frame.startswith(START), frame[:20]
        return frame[1:].decode()

    def exchange(self, message: str | bytes) -> dict:
        self.send(message)
        return parse_ack(self.receive())

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def parse_ack(text: str) -> dict:
    segments = {s[:3]: s.split("|") for s in text.split("\r") if s}
    msa = segments["MSA"]
    out = {"code": msa[1], "control_id": msa[2] if len(msa) > 2 else "", "text": msa[3] if len(msa) > 3 else "",
           "msh": segments["MSH"], "raw": text}
    if "ERR" in segments:
        err = segments["ERR"]
        out["err_location"] = err[2]
        out["err_code"] = err[3].split("^")[0]
        out["err_text"] = err[8] if len(err) > 8 else ""
    return out
