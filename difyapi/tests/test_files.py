"""POST /v1/files/upload and GET /v1/files/{id}/preview (SPEC.md §8): the 1.x key set, limits and error codes,
storage under MEDIA_ROOT, preview bytes, signed URLs, and isolation between apps."""
from __future__ import annotations

import hashlib
import hmac
import time
import uuid
import warnings
from urllib.parse import urlsplit

import pytest
from asgiref.sync import sync_to_async
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import AsyncClient

from difyapi.models import EndUser, MessageFile, UploadFile
from difyapi.tests.factories import DifyClient, assert_error, make_app, make_key, make_message, make_session

pytestmark = pytest.mark.django_db

UPLOAD_KEYS = {"id", "name", "size", "extension", "mime_type", "created_by", "created_at", "preview_url",
               "source_url", "original_url", "user_id", "tenant_id", "conversation_id", "file_key"}
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture(autouse=True)
def media(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path
    return tmp_path


@pytest.fixture
def app():
    return make_app()


@pytest.fixture
def client(app):
    client = DifyClient(make_key(app))
    yield client
    client.close()


def file(name="chart.png", content=PNG, content_type="image/png"):
    return SimpleUploadedFile(name, content, content_type=content_type)


def upload(client, **data):
    return client.upload("/v1/files/upload", {"user": "alice", **data})


def test_upload_answers_201_with_difys_keys_and_stores_the_file(app, client, media):
    response = upload(client, file=file())
    assert response.status_code == 201, response.content
    data = response.json()
    assert set(data) == UPLOAD_KEYS
    row = UploadFile.objects.get(pk=data["id"])
    end_user = EndUser.objects.get(app=app, session_id="alice")
    assert data["name"] == "chart.png" and data["size"] == len(PNG) and data["extension"] == "png"
    assert data["mime_type"] == "image/png" and isinstance(data["created_at"], int)
    assert data["created_by"] == str(end_user.id) and row.end_user == end_user
    assert data["tenant_id"] == str(app.id) and data["user_id"] is None and data["conversation_id"] is None
    stored = media / row.file.name
    assert stored.read_bytes() == PNG
    # The signed source_url serves the bytes without the app key.
    assert DifyClient(None).get(data["source_url"].split("testserver", 1)[1]).getvalue() == PNG


def test_user_is_optional_and_defaults_to_default_user(app, client):
    response = client.upload("/v1/files/upload", {"file": file()})
    assert response.status_code == 201
    assert EndUser.objects.get(pk=response.json()["created_by"]).session_id == "DEFAULT-USER"


@pytest.mark.parametrize(("name", "content", "mime_type"), [
    ("notes.txt", b"hello", "text/plain"), ("a.md", b"# hi", "text/markdown"), ("data.csv", b"a,b\n1,2", "text/csv"),
    ("x.json", b"{}", "application/json"), ("app.log", b"ok", "text/plain"), ("c.yaml", b"a: 1", "text/plain"),
    ("r.pdf", b"%PDF-1.7\n", "application/pdf"), ("p.html", b"<p>hi</p>", "text/plain"),
    ("w.docx", b"PK\x03\x04\x14\x00", "application/vnd.openxmlformats-officedocument.wordprocessingml.document"),
])
def test_document_types_are_accepted_with_the_type_of_their_bytes(client, name, content, mime_type):
    response = upload(client, file=file(name, content, "application/x-anything"))
    assert response.status_code == 201, response.content
    assert response.json()["mime_type"] == mime_type
    assert UploadFile.objects.get().mime_type == mime_type


def test_declared_type_is_ignored_for_images(client):
    jpeg_named_png = b"\xff\xd8\xff\xe0" + b"\x00" * 16
    assert upload(client, file=file("chart.png", PNG, "text/html")).json()["mime_type"] == "image/png"
    assert upload(client, file=file("photo.png", jpeg_named_png, "image/png")).json()["mime_type"] == "image/jpeg"


@pytest.mark.parametrize(("name", "content"), [
    ("chart.png", b"<html><script>alert(1)</script></html>"), ("r.pdf", b"<script>alert(1)</script>"),
    ("w.docx", b"hello"), ("notes.txt", b"MZ\x90\x00\x03\x00"), ("logo.svg", b"<svg/>"),
    ("page.xhtml", b"<html/>"), ("empty.png", b""),
])
def test_bytes_that_are_not_what_the_name_says_are_415(client, name, content):
    assert_error(upload(client, file=file(name, content, "image/png")), 415, "unsupported_file_type",
                 "File type not allowed.")
    assert not UploadFile.objects.exists()


def test_no_file(client):
    assert_error(upload(client), 400, "no_file_uploaded", "Please upload your file.")
    assert_error(upload(client, other=file()), 400, "no_file_uploaded")


def test_too_many_files(client):
    response = client.upload("/v1/files/upload", {"user": "alice", "file": [file(), file("b.png")]})
    assert_error(response, 400, "too_many_files", "Only one file is allowed.")
    assert not UploadFile.objects.exists()


@pytest.mark.parametrize(("name", "content_type"), [("run.exe", "application/octet-stream"), ("noext", "text/plain"),
                                                     ("song.mp3", "audio/mpeg")])
def test_unsupported_types_are_415(client, name, content_type):
    assert_error(upload(client, file=file(name, b"x", content_type)), 415, "unsupported_file_type",
                 "File type not allowed.")


def test_missing_mime_type_is_415(client):
    assert_error(upload(client, file=file(content_type="")), 415, "unsupported_file_type")


def raw_multipart(filename: str) -> bytes:
    # Django's test client strips directories from file names itself, so the body is written by hand.
    return (
        f'--XX\r\nContent-Disposition: form-data; name="user"\r\n\r\nalice\r\n'
        f'--XX\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: image/png\r\n\r\n"
    ).encode() + PNG + b"\r\n--XX--\r\n"


@pytest.mark.parametrize("name", ["a\\\\b.png", "../etc/b.png", "dir/b.png"])
def test_path_separators_in_filename_are_invalid_param(client, name):
    response = client.post_raw("/v1/files/upload", raw_multipart(name), "multipart/form-data; boundary=XX")
    assert_error(response, 400, "invalid_param", "Filename contains invalid characters")
    assert not UploadFile.objects.exists()


def test_plain_name_in_a_raw_multipart_body_is_accepted(client):
    response = client.post_raw("/v1/files/upload", raw_multipart("b.png"), "multipart/form-data; boundary=XX")
    assert response.status_code == 201 and response.json()["name"] == "b.png"


def test_non_multipart_upload_is_no_file(client):
    assert_error(client.post("/v1/files/upload", {"user": "alice"}), 400, "no_file_uploaded")


def test_size_limits_by_type(client, settings):
    settings.UPLOAD_IMAGE_FILE_SIZE_LIMIT_MB = 1
    settings.UPLOAD_FILE_SIZE_LIMIT_MB = 2
    big = b"x" * (1024 * 1024 + 1)
    response = upload(client, file=file("big.png", big))
    assert_error(response, 413, "file_too_large")
    assert response.json()["message"].startswith("File size exceeded.")
    assert upload(client, file=file("big.txt", big, "text/plain")).status_code == 201
    assert_error(upload(client, file=file("huge.txt", big * 2, "text/plain")), 413, "file_too_large")
    assert UploadFile.objects.count() == 1


def test_preview_returns_the_bytes(client):
    file_id = upload(client, file=file()).json()["id"]
    response = client.get(f"/v1/files/{file_id}/preview")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert response.getvalue() == PNG
    assert "attachment" not in response.get("Content-Disposition", "")
    assert response["X-Content-Type-Options"] == "nosniff" and "sandbox" in response["Content-Security-Policy"]
    response = client.get(f"/v1/files/{file_id}/preview", {"as_attachment": "true"})
    assert response["Content-Disposition"].startswith("attachment") and "chart.png" in response["Content-Disposition"]


def test_preview_of_a_document_is_an_inert_attachment(client):
    file_id = upload(client, file=file("page.html", b"<script>alert(1)</script>", "text/html")).json()["id"]
    response = client.get(f"/v1/files/{file_id}/preview")
    assert response.status_code == 200 and response.getvalue() == b"<script>alert(1)</script>"
    assert response["Content-Type"] == "text/plain"
    assert response["Content-Disposition"].startswith("attachment") and "page.html" in response["Content-Disposition"]
    assert response["X-Content-Type-Options"] == "nosniff"
    assert response["Content-Security-Policy"] == "sandbox; default-src 'none'; frame-ancestors 'none'"


@pytest.mark.parametrize("stored_type", ["text/html", "image/svg+xml", "application/xhtml+xml", "text/xml", ""])
def test_a_stored_active_type_is_never_served(app, client, stored_type):
    # Rows written before types were sniffed kept the client's word.
    row = UploadFile.objects.get(pk=upload(client, file=file()).json()["id"])
    UploadFile.objects.filter(pk=row.pk).update(mime_type=stored_type)
    response = client.get(f"/v1/files/{row.pk}/preview")
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"].startswith("attachment")


def test_preview_of_another_apps_file_is_404(client):
    other = DifyClient(make_key(make_app()))
    file_id = upload(other, file=file()).json()["id"]
    assert_error(client.get(f"/v1/files/{file_id}/preview"), 404, "file_not_found")
    assert_error(client.get(f"/v1/files/{uuid.uuid4()}/preview"), 404, "file_not_found")


def test_preview_needs_the_key(client):
    file_id = upload(client, file=file()).json()["id"]
    assert_error(DifyClient(None).get(f"/v1/files/{file_id}/preview"), 401, "unauthorized")


def test_signed_url_refuses_a_bad_signature(client):
    source_url = upload(client, file=file()).json()["source_url"]
    parts = urlsplit(source_url)
    tampered = f"{parts.path}?{parts.query[:-4]}beef"
    assert_error(DifyClient(None).get(tampered), 403, "forbidden")
    assert_error(DifyClient(None).get(parts.path), 403, "forbidden")


def test_signed_url_refuses_an_hmac_of_the_secret_key_made_for_another_purpose(client, settings):
    """The signature is salted with its purpose: a plain HMAC of the same text under SECRET_KEY (as any other use of
    the key might produce) does not pass."""
    file_id = upload(client, file=file()).json()["id"]
    timestamp, nonce = str(int(time.time())), "abcd"
    unsalted = hmac.new(settings.SECRET_KEY.encode(), f"{file_id}|{timestamp}|{nonce}".encode(), hashlib.sha256)
    forged = f"/v1/files/{file_id}/file-preview?timestamp={timestamp}&nonce={nonce}&sign={unsalted.hexdigest()}"
    assert_error(DifyClient(None).get(forged), 403, "forbidden")


def test_uploaded_file_appears_in_message_files(app, client):
    data = upload(client, file=file()).json()
    message = make_message(make_session(app))
    MessageFile.objects.create(message=message, type="image", transfer_method="local_file",
                               upload_file_id=data["id"], belongs_to="user")
    history = client.get("/v1/messages", {"user": "alice", "conversation_id": str(message.session_id)}).json()
    [item] = history["data"][0]["message_files"]
    assert item["upload_file_id"] == data["id"] and item["filename"] == "chart.png"
    assert item["mime_type"] == "image/png" and item["size"] == len(PNG) and item["transfer_method"] == "local_file"
    assert item["url"].startswith("http://testserver/v1/files/")
    assert DifyClient(None).get(item["url"].split("testserver", 1)[1]).getvalue() == PNG


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("close_worker_connections")
async def test_preview_under_asgi_streams_the_file_in_chunks(media):
    # Under ASGI a synchronous file iterator is read whole into memory first (Django warns): the file must go out
    # as an asynchronous stream.
    app = await sync_to_async(make_app)()
    client = DifyClient(await sync_to_async(make_key)(app))
    content = PNG + bytes(range(256)) * 1000
    file_id = (await sync_to_async(upload)(client, file=file(content=content))).json()["id"]
    await sync_to_async(client.close)()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        response = await AsyncClient().get(f"/v1/files/{file_id}/preview", headers=client.headers)
        body = b"".join([chunk async for chunk in response])
    assert response.status_code == 200 and body == content
    assert response["Content-Length"] == str(len(content)) and response["Content-Type"] == "image/png"
    assert [str(w.message) for w in caught if "synchronous iterators" in str(w.message)] == []
