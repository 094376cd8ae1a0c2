#!/usr/bin/env python3
"""An independent OCI artifact pusher for Ferry's model tests: Python 3 standard library
only, speaking the OCI distribution spec's push API itself (chunked: POST an upload,
PATCH the bytes, PUT with the digest), so Ferry's puller is not tested against its own
writer alone.

    oci_push.py HOST:PORT REPO:TAG SPEC_JSON

SPEC_JSON: {"artifact_type": "...", "config_media_type": "...", "config": {...},
            "layers": [{"media_type": "...", "file": "/path", "filepath": "name"},
                       {"media_type": "...", "filepath": "code",
                        "tar": [{"name": "code/a.py", "data": "..."},
                                {"name": "code/", "type": "dir"},
                                {"name": "l", "type": "symlink", "target": "a.py"}]}]}
Prints the manifest digest. Basic auth from OCI_USER / OCI_PASSWORD when set.
"""
import base64
import hashlib
import io
import json
import os
import sys
import tarfile
import urllib.error
import urllib.request


def request(method, url, body=None, headers=None):
    headers = dict(headers or {})
    user = os.environ.get("OCI_USER")
    if user:
        token = base64.b64encode(f"{user}:{os.environ.get('OCI_PASSWORD', '')}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def absolute(base, location):
    return location if location.startswith("http") else base + location


def push_blob(base, repo, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    status, _, _ = request("HEAD", f"{base}/v2/{repo}/blobs/{digest}")
    if status == 200:
        return digest
    status, headers, body = request("POST", f"{base}/v2/{repo}/blobs/uploads/")
    assert status == 202, (status, body)
    location = absolute(base, headers["Location"])
    # One PATCH per 1 MiB chunk, each with its Content-Range, then the closing PUT.
    offset = 0
    while offset < len(data):
        chunk = data[offset:offset + (1 << 20)]
        status, headers, body = request(
            "PATCH", location, chunk,
            {"Content-Type": "application/octet-stream",
             "Content-Range": f"{offset}-{offset + len(chunk) - 1}",
             "Content-Length": str(len(chunk))})
        assert status == 202, (status, body)
        location = absolute(base, headers["Location"])
        offset += len(chunk)
    sep = "&" if "?" in location else "?"
    status, _, body = request("PUT", f"{location}{sep}digest={digest}", b"",
                              {"Content-Length": "0"})
    assert status == 201, (status, body)
    return digest


def tar_bytes(entries):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry["name"])
            kind = entry.get("type", "file")
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            elif kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = entry["target"]
                tar.addfile(info)
            else:
                data = entry["data"].encode()
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def main():
    host, repo_tag, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    repo, tag = repo_tag.rsplit(":", 1)
    base = f"http://{host}"
    layers = []
    for layer in spec["layers"]:
        if "tar" in layer:
            data = tar_bytes(layer["tar"])
        else:
            with open(layer["file"], "rb") as f:
                data = f.read()
        digest = push_blob(base, repo, data)
        descriptor = {"mediaType": layer["media_type"], "digest": digest, "size": len(data)}
        if layer.get("filepath"):
            descriptor["annotations"] = {"org.cncf.model.filepath": layer["filepath"]}
        layers.append(descriptor)
    config = json.dumps(spec.get("config", {})).encode()
    config_digest = push_blob(base, repo, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": spec.get("config_media_type",
                                         "application/vnd.cncf.model.config.v1+json"),
                   "digest": config_digest, "size": len(config)},
        "layers": layers,
    }
    if spec.get("artifact_type"):
        manifest["artifactType"] = spec["artifact_type"]
    body = json.dumps(manifest, indent=2).encode()
    status, _, reply = request("PUT", f"{base}/v2/{repo}/manifests/{tag}", body,
                               {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    assert status == 201, (status, reply)
    print("sha256:" + hashlib.sha256(body).hexdigest())


if __name__ == "__main__":
    main()
