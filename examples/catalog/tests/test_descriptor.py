"""Reading catalog-info.yaml."""

from __future__ import annotations

from catalog_provider import Descriptor, parse_descriptor


def test_every_document_is_an_entity() -> None:
    text = (
        "apiVersion: backstage.io/v1alpha1\nkind: Component\nmetadata: {name: web}\n"
        "---\n"
        "apiVersion: backstage.io/v1alpha1\nkind: API\nmetadata: {name: web-api}\n"
        "spec: {definition: {since: 2024-05-14}}\n"
    )
    parsed = parse_descriptor(text)
    assert [(e["kind"], e["metadata"]["name"]) for e in parsed.entities] == [
        ("Component", "web"),
        ("API", "web-api"),
    ]
    assert parsed.errors == ()


def test_no_file_and_an_empty_file_declare_nothing() -> None:
    assert parse_descriptor(None) == Descriptor()
    assert parse_descriptor("") == Descriptor()
    assert parse_descriptor("---\n---\n") == Descriptor()


def test_a_document_without_the_envelope_is_reported_and_the_others_kept() -> None:
    text = (
        "apiVersion: backstage.io/v1alpha1\nkind: Component\nmetadata: {name: web}\n"
        "---\nkind: Component\nmetadata: {name: nameless-version}\n"
        "---\napiVersion: v1\nkind: Group\nmetadata: {}\n"
        "---\n- a list\n"
    )
    parsed = parse_descriptor(text)
    assert [e["metadata"]["name"] for e in parsed.entities] == ["web"]
    assert parsed.errors == (
        "document 2: apiVersion must be a non-empty string",
        "document 3: metadata.name must be a non-empty string",
        "document 4: expected a mapping with apiVersion, kind and metadata, got list",
    )


def test_yaml_that_does_not_parse_is_reported() -> None:
    parsed = parse_descriptor("kind: [Component\n")
    assert parsed.entities == ()
    [error] = parsed.errors
    assert error.startswith("not valid YAML: ")
    assert "\n" not in error
