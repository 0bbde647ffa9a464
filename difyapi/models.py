"""What the Dify Service API adds to the agent: app API keys, end users, uploaded files, message files, feedback,
annotations (stock answers) with their reply setting, jobs and hit history."""
import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q

from agentcore.models import UsageLimits


class ApiKey(UsageLimits):
    """An `app-...` key. Only its SHA-256 is stored, plus the last 4 characters for display. Its limits apply on top
    of its app's, so they can only narrow them."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    app = models.ForeignKey("agentcore.AgentApp", on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, blank=True, default="")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    last4 = models.CharField(max_length=4, editable=False)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"app-…{self.last4}"


class EndUser(models.Model):
    """A `user` string a client sent, scoped to one app (Dify's EndUser of type service-api)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    app = models.ForeignKey("agentcore.AgentApp", on_delete=models.CASCADE, related_name="end_users")
    session_id = models.CharField(max_length=255)
    type = models.CharField(max_length=32, default="service-api")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["app", "session_id"], name="enduser_unique_per_app")]

    def __str__(self) -> str:
        return self.session_id


def upload_path(instance: "UploadFile", filename: str) -> str:
    return f"uploads/{instance.app_id}/{instance.id}{('.' + instance.extension) if instance.extension else ''}"


class UploadFile(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    app = models.ForeignKey("agentcore.AgentApp", on_delete=models.CASCADE, related_name="upload_files")
    end_user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="upload_files")
    name = models.CharField(max_length=255)
    size = models.PositiveBigIntegerField()
    extension = models.CharField(max_length=32, blank=True, default="")
    mime_type = models.CharField(max_length=255, blank=True, default="")
    file = models.FileField(upload_to=upload_path, max_length=500)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.name


class MessageFile(models.Model):
    """A file attached to a message: sent by the user (upload or remote URL) or produced by the assistant."""

    class TransferMethod(models.TextChoices):
        LOCAL_FILE = "local_file"
        REMOTE_URL = "remote_url"
        TOOL_FILE = "tool_file"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    message = models.ForeignKey("agentcore.Message", on_delete=models.CASCADE, related_name="message_files")
    type = models.CharField(max_length=16, default="image")
    transfer_method = models.CharField(max_length=16, choices=TransferMethod.choices)
    url = models.CharField(max_length=2000, blank=True, default="")
    upload_file = models.ForeignKey(UploadFile, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    belongs_to = models.CharField(max_length=16, default="user")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]

    def __str__(self) -> str:
        return f"{self.type} {self.transfer_method} ({self.belongs_to})"


class Feedback(models.Model):
    class Rating(models.TextChoices):
        LIKE = "like"
        DISLIKE = "dislike"

    class FromSource(models.TextChoices):
        USER = "user"
        ADMIN = "admin"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    app = models.ForeignKey("agentcore.AgentApp", on_delete=models.CASCADE, related_name="feedbacks")
    session = models.ForeignKey("agentcore.Session", on_delete=models.CASCADE, related_name="feedbacks")
    message = models.ForeignKey("agentcore.Message", on_delete=models.CASCADE, related_name="feedbacks")
    rating = models.CharField(max_length=16, choices=Rating.choices)
    content = models.TextField(blank=True, default="")
    from_source = models.CharField(max_length=16, choices=FromSource.choices, default=FromSource.USER)
    end_user = models.ForeignKey(EndUser, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    account = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["message", "from_source"], condition=Q(from_source="user"), name="feedback_one_user_per_message"
            ),
            models.CheckConstraint(condition=Q(rating__in=["like", "dislike"]), name="feedback_rating_known"),
        ]

    def __str__(self) -> str:
        return f"{self.rating} on {self.message_id}"


class Annotation(models.Model):
    """A stock answer (Dify's MessageAnnotation): with annotation replies on, a query close enough to `question` is
    answered with `answer` and no model call. `embedding` is the question's vector (float32 bytes) from
    `embedding_config`; it is recomputed when the question or the app's embedding config changes."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    app = models.ForeignKey("agentcore.AgentApp", on_delete=models.CASCADE, related_name="annotations")
    question = models.TextField()
    answer = models.TextField()
    hit_count = models.PositiveIntegerField(default=0)
    embedding = models.BinaryField(null=True, blank=True, editable=False)
    embedding_config = models.ForeignKey(
        "llmconfigs.LLMConfig", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", editable=False
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["app", "-created_at"])]

    def __str__(self) -> str:
        return self.question[:80]


class AnnotationSetting(models.Model):
    """An app's annotation reply (Dify's AppAnnotationSetting): on or off, the embedding config that embeds questions
    and queries, and the cosine score a query needs. `index_version` grows with every change to the app's
    annotations or this row, so each worker knows when its in-memory index is stale."""

    app = models.OneToOneField(
        "agentcore.AgentApp", on_delete=models.CASCADE, primary_key=True, related_name="annotation_setting"
    )
    enabled = models.BooleanField(default=False)
    score_threshold = models.FloatField(default=0.9)
    embedding_config = models.ForeignKey(
        "llmconfigs.LLMConfig", null=True, blank=True, on_delete=models.SET_NULL, related_name="+",
        limit_choices_to={"is_embedding": True},
    )
    index_version = models.PositiveBigIntegerField(default=0, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(score_threshold__gte=0) & Q(score_threshold__lte=1),
                                   name="annotationsetting_threshold_range"),
        ]

    def __str__(self) -> str:
        return f"annotation reply of {self.app_id}: {'on' if self.enabled else 'off'}"


class AnnotationJob(models.Model):
    """An enable or disable of annotation replies (Dify runs it as a background job and reports its status)."""

    class Action(models.TextChoices):
        ENABLE = "enable"
        DISABLE = "disable"

    class Status(models.TextChoices):
        WAITING = "waiting"
        PROCESSING = "processing"
        COMPLETED = "completed"
        ERROR = "error"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    app = models.ForeignKey("agentcore.AgentApp", on_delete=models.CASCADE, related_name="annotation_jobs")
    action = models.CharField(max_length=16, choices=Action.choices)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.WAITING)
    error_msg = models.TextField(blank=True, default="")
    score_threshold = models.FloatField()
    embedding_provider_name = models.CharField(max_length=255)
    embedding_model_name = models.CharField(max_length=255)
    # Chosen directly in the admin; through the API the config is found from the two names when the job runs.
    embedding_config = models.ForeignKey(
        "llmconfigs.LLMConfig", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(action__in=["enable", "disable"]), name="annotationjob_action_known"),
            models.CheckConstraint(condition=Q(status__in=["waiting", "processing", "completed", "error"]),
                                   name="annotationjob_status_known"),
        ]

    def __str__(self) -> str:
        return f"{self.action} {self.status}"


class AnnotationHit(models.Model):
    """One query answered by an annotation (Dify's AppAnnotationHitHistory): which message, how close."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    app = models.ForeignKey("agentcore.AgentApp", on_delete=models.CASCADE, related_name="+")
    annotation = models.ForeignKey(Annotation, on_delete=models.CASCADE, related_name="hits")
    message = models.OneToOneField("agentcore.Message", on_delete=models.CASCADE, related_name="annotation_hit")
    question = models.TextField()
    score = models.FloatField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.annotation_id} ({self.score:.3f})"


class HumanInputForm(models.Model):
    """An approval offered through Dify's Human Input protocol (difyapi.human_input): a form with a token the client
    got in `human_input_required`. Only the token's SHA-256 is stored. The form lives while its approval is pending
    and until `expires_at`; `submitted_at` is set once, in the transaction that decides the approval."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)  # Dify's form_id
    app = models.ForeignKey("agentcore.AgentApp", on_delete=models.CASCADE, related_name="human_input_forms")
    approval = models.OneToOneField("agentcore.Approval", on_delete=models.CASCADE, related_name="human_input_form")
    end_user = models.CharField(max_length=255)  # the `user` whose conversation paused
    token_hash = models.CharField(max_length=64, unique=True, editable=False)
    expires_at = models.DateTimeField()
    submitted_at = models.DateTimeField(null=True, blank=True)
    action = models.CharField(max_length=20, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(submitted_at__isnull=True, action="") | Q(submitted_at__isnull=False, action__in=[
                    "approve", "reject"]),
                name="human_input_form_submission_complete",
            ),
        ]

    def __str__(self) -> str:
        return f"form {self.id} ({self.approval_id})"
